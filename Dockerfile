# One image, two entry points (as CloudNativePG has it): `mailfleet operator` (the default) and
# `mailnode serve`, which the operator's StatefulSets run as their command (mailfleet.specs.workload).
# Runs as the uid of mailfleet.specs.common.RUN_AS (10001); in the cluster its root filesystem is read-only
# and mail lives on the volume at /var/lib/mailnode. tests/chart/test_image.py holds these to the code.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

COPY pyproject.toml README.md /src/
COPY mailwire /src/mailwire
COPY mailnode /src/mailnode
COPY operator/mailfleet /src/operator/mailfleet
RUN pip install --no-cache-dir /src \
    && rm -rf /src \
    && groupadd --gid 10001 mailfleet \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin mailfleet \
    && install -d -o 10001 -g 10001 /var/lib/mailnode

USER 10001:10001
WORKDIR /var/lib/mailnode
ENTRYPOINT ["mailfleet"]
CMD ["operator"]
