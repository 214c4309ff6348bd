# One image, two entry points (as CloudNativePG has it): `mailfleet operator` (the default) and
# `mailnode serve`, which the operator's StatefulSets run as their command (mailfleet.specs.workload).
# Runs as the uid of mailfleet.specs.common.RUN_AS (10001); in the cluster its root filesystem is read-only
# and mail lives on the volume at /var/lib/mailnode. tests/chart/test_image.py holds the text to the code,
# tests/image/test_build.py builds it (scripts/build-image, `make image`) and runs it.
#
# BASE is any Debian-like image with python3 >= 3.11 and its venv module, and useradd/groupadd: the
# default is the official python:3.11-slim, pinned by digest; scripts/build-image passes a local base made
# from Debian's own packages (mmdebstrap of bookworm). The project goes into a virtualenv, so the same RUN
# works where python3 is "externally managed" (PEP 668, Debian's python3) and where it is not.
# To move the default to a newer python:3.11-slim: `docker buildx imagetools inspect python:3.11-slim` gives
# the digest of its index (all platforms).
ARG BASE=python:3.11-slim@sha256:9c900dea9e8fb7e16277c179b555cc72d29a352dbc33cff48ad5a0412fd5bfc7
FROM ${BASE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/mailfleet/bin:$PATH

COPY pyproject.toml README.md /src/
COPY mailwire /src/mailwire
COPY mailnode /src/mailnode
COPY operator/mailfleet /src/operator/mailfleet
# pip and setuptools only install: they leave with the sources (and no cache), so the image carries the
# project and its dependencies (all wheels: no compiler is needed, none is in the image).
RUN python3 -m venv /opt/mailfleet \
    && pip install --no-cache-dir /src \
    && pip uninstall --yes pip setuptools \
    && rm -rf /src \
    && groupadd --gid 10001 mailfleet \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin mailfleet \
    && install -d -o 10001 -g 10001 /var/lib/mailnode

USER 10001:10001
WORKDIR /var/lib/mailnode
ENTRYPOINT ["mailfleet"]
CMD ["operator"]
