"""A private Dovecot (Debian's dovecot-imapd) on a temporary directory: its config, password file, start and stop.

Used by the IMAP benchmark (bench.imap, the speed baseline) and by the differential test
(tests/node/test_imap_dovecot.py, the behaviour baseline), so both talk to the same Dovecot set-up.
The instance shares only the programs with the system's /etc/dovecot; it needs root (its master runs as
root and drops to the `nobody` user for mail), and its directory must be walkable by unprivileged users.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pwd
import subprocess
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from bench import common
from bench.common import HOST, START_TIMEOUT, BenchError

PACKAGE = "dovecot-imapd"  # the Debian package with Dovecot's IMAP server

CONF = """\
# A private Dovecot: it shares only the programs with the system's /etc/dovecot.
base_dir = {run}
state_dir = {state}
instance_name = {instance}
log_path = {log}
protocols = imap
listen = {host}
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
# Successful logins remembered for 5 minutes, as the node's auth.cache_ttl (300 s) does by default.
auth_cache_size = 10M
auth_cache_ttl = 5 mins
default_login_user = {login_user}
default_internal_user = {internal_user}
first_valid_uid = {uid}
first_valid_gid = {gid}
# Maildir like the node's store, fsynced like it.
mail_location = maildir:{mail}/%d/%n
mail_fsync = always
# Room for the sessions: one imap process each (Dovecot's default), all of one user from one address.
default_process_limit = {process_limit}
default_client_limit = {client_limit}
protocol imap {{
  mail_max_userip_connections = {process_limit}
}}
passdb {{
  driver = passwd-file
  args = username_format=%u {passwd}
}}
userdb {{
  driver = static
  args = uid={uid} gid={gid} home={home}/%d/%n
}}
service imap-login {{
  inet_listener imap {{
    address = {host}
    port = {port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
service imap {{
  process_limit = {process_limit}
}}
{extra}"""


@dataclasses.dataclass(frozen=True)
class Instance:
    """A configured (not yet started) Dovecot: where everything lives and which port it will listen on."""

    workdir: Path
    config: Path
    port: int
    mail: Path  # Maildirs: mail/<domain>/<local part>
    home: Path
    log_file: Path
    mail_user: pwd.struct_passwd  # the owner of the mail files

    def maildir(self, address: str) -> Path:
        local, _, domain = address.partition("@")
        return self.mail / domain / local


def version() -> str:
    return common.program_version("dovecot", PACKAGE, "--version")


def user(name: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError as error:
        raise BenchError(f"no user {name}: install Debian's {PACKAGE} package (scripts/bootstrap)") from error


def chown_tree(path: Path, uid: int, gid: int) -> None:
    os.chown(path, uid, gid)
    for directory, subdirectories, files in os.walk(path):
        for name in (*subdirectories, *files):
            os.chown(os.path.join(directory, name), uid, gid)  # noqa: PTH118 (os.walk gives strings)


def setup(
    workdir: Path,
    *,
    passwords: Mapping[str, str],
    sessions: int,
    instance: str,
    extra: str = "",
    port: int | None = None,
) -> Instance:
    """Write the config and the password file (login -> Dovecot password such as "{PLAIN}secret") under
    `workdir`, which must exist and be walkable by unprivileged users. Room for `sessions` connections;
    `extra` is appended to the config (the differential test's namespace, say); `port` is a free one
    unless given."""
    common.require_root("Dovecot")
    login_user, internal_user = user("dovenull"), user("dovecot")
    mail_user = user("nobody")  # the mail files' owner: unprivileged, and Dovecot refuses system uids
    if port is None:
        (port,) = common.free_ports(1)
    mail, home = workdir / "mail", workdir / "home"
    for directory in (mail, home, workdir / "state"):
        directory.mkdir(parents=True)
    passwd = workdir / "users"
    passwd.write_text("".join(f"{login}:{password}\n" for login, password in passwords.items()), encoding="utf-8")
    values = {
        "run": workdir / "run", "state": workdir / "state", "log": workdir / "dovecot.log", "host": HOST,
        "instance": instance, "login_user": login_user.pw_name, "internal_user": internal_user.pw_name,
        "uid": mail_user.pw_uid, "gid": mail_user.pw_gid, "mail": mail, "home": home, "passwd": passwd,
        "port": port, "extra": extra, "process_limit": max(100, sessions),
        "client_limit": max(1000, 2 * sessions + 100),
    }  # fmt: skip
    config = workdir / "dovecot.conf"
    config.write_text(CONF.format(**values), encoding="utf-8")
    for login in passwords:
        local, _, domain = login.partition("@")
        (home / domain / local).mkdir(parents=True, exist_ok=True)
    return Instance(workdir, config, port, mail, home, workdir / "dovecot.log", mail_user)


def errors(log_file: Path) -> list[str]:
    lines = common.log_lines(log_file)
    return [line for line in lines if any(f": {level}: " in line for level in ("Error", "Fatal", "Panic"))]


def greets(port: int) -> bool:
    return common.greets(port, b"* OK", b"z LOGOUT\r\n")


@dataclasses.dataclass
class Running:
    """A started Dovecot master; `died()` says why it exited, if it did."""

    instance: Instance
    proc: subprocess.Popen[bytes]
    out_file: Path

    def died(self) -> str | None:
        if self.proc.poll() is None:
            return None
        return (
            f"dovecot exited with code {self.proc.returncode}; its output:\n{common.tail(self.out_file)}\n"
            f"  {self.instance.log_file} ends with:\n{common.tail(self.instance.log_file)}"
        )


@contextlib.contextmanager
def running(instance: Instance, *, preexec_fn: Callable[[], None] | None = None) -> Iterator[Running]:
    """Start Dovecot in the foreground, wait for its greeting, and stop it (and its children) at the end.
    The mail and home directories are handed to the mail user first (whatever was written there)."""
    chown_tree(instance.mail, instance.mail_user.pw_uid, instance.mail_user.pw_gid)
    chown_tree(instance.home, instance.mail_user.pw_uid, instance.mail_user.pw_gid)
    out_file = instance.workdir / "dovecot.out"
    with out_file.open("wb") as out:
        proc = subprocess.Popen(
            [common.tool("dovecot", PACKAGE), "-c", str(instance.config), "-F"], stdin=subprocess.DEVNULL,
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=preexec_fn,
        )  # fmt: skip
    started = Running(instance, proc, out_file)
    try:
        common.wait_for("dovecot", lambda: greets(instance.port), timeout=START_TIMEOUT, alive=started.died)
        yield started
    finally:
        common.stop_process(proc)  # the master stops its children; the process group catches any it left
