"""A GSS-API-enabled Dante client library and server, built once from
Debian's own ``dante`` source package and cached, for the GSS-API interop
tests and benchmarks/gssapi_bulk.py.

Debian configures dante ``--without-gssapi``, so its dante-client cannot speak
RFC 1961. We rebuild the very same source (Debian's patches, Debian's
debian/rules, Debian's hardening flags) with ``--with-gssapi`` and keep only
what the tests and the benchmark need: ``libdsocksd.so.0``, its ``socksify``
script, and the server ``sockd`` (Debian installs it as ``danted``) of the
same build, for a GSS-API baseline in benchmarks/gssapi_bulk.py. The
result lives under
/var/cache/socksd-tests/dante-gssapi/<source version>-recipe<RECIPE>/,
so later runs (and CI on the same machine) reuse it; a new Debian upload of
dante means a new directory and one new build.

On a fresh bookworm machine ``ensure()`` adds deb-src entries mirroring the
existing Debian ones, installs ``apt-get build-dep dante`` plus dpkg-dev and
libkrb5-dev, and builds (a minute or two). Any failure raises
DanteBuildError carrying the log tail: the tests FAIL, never skip.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import stat
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

CACHE_ROOT = Path(os.environ.get("SOCKSD_DANTE_GSSAPI_CACHE",
                                 "/var/cache/socksd-tests/dante-gssapi"))
SOURCE = "dante"
# Bump when the recipe below changes: cached builds of another recipe are rebuilt.
RECIPE = 2      # 2: the server (sockd) is kept too
# Not in dante's Build-Depends (Debian builds it without GSS-API); dpkg-dev
# for `apt-get source` (dpkg-source).
EXTRA_DEBS = ("dpkg-dev", "libkrb5-dev")
LIBRARY = "libdsocksd.so.0"      # Debian's name for libdsocks (rename-library.patch)
SERVER = "sockd"                  # the server binary of the build tree (Debian's danted)
DEB_SRC_FILE = Path("/etc/apt/sources.list.d/socksd-tests-deb-src.sources")
# The build sees the system's tools only: no pyenv shims, no venv, no user PATH.
SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
BUILD_TIMEOUT = 1800
LOG_TAIL = 6000


class DanteBuildError(AssertionError):
    """Building the GSS-API Dante failed; str() says why, with the log tail."""


@dataclass(frozen=True)
class DanteGSSAPI:
    """A cached build: ``socksify`` runs a program with ``library`` preloaded;
    ``sockd`` is the server of the same build."""

    version: str
    directory: Path

    @property
    def library(self) -> Path:
        return self.directory / LIBRARY

    @property
    def socksify(self) -> Path:
        return self.directory / "socksify"

    @property
    def sockd(self) -> Path:
        return self.directory / SERVER

    def env(self, socks_conf: Path, extra: dict[str, str] | None = None,
            debug: int = 0, log: Path | None = None) -> dict[str, str]:
        """Environment for ``socksify PROGRAM``: Dante's socksify preloads
        ``libdsocksd.so.0`` by name, found first in SOCKS_LIBDIR (ours)."""
        env = dict(os.environ)
        for name in list(env):
            if name.startswith(("SOCKS", "LD_PRELOAD")) or name.lower().endswith("_proxy"):
                del env[name]
        env.update(extra or {})
        env.update({
            "SOCKS_CONF": str(socks_conf),
            "SOCKS_LIBDIR": str(self.directory),
            # Else Dante adds direct routes for the local interfaces'
            # networks, which can take connections around the proxy under test.
            "SOCKS_AUTOADD_LANROUTES": "no",
            "SOCKS_DIRECTROUTE_FALLBACK": "no",
        })
        if debug:
            env["SOCKS_DEBUG"] = str(debug)
        if log is not None:
            env["SOCKS_LOGOUTPUT"] = str(log)
            env["SOCKS_ERRLOGOUTPUT"] = str(log)
        return env


_failure: DanteBuildError | None = None
_built: DanteGSSAPI | None = None


def ensure() -> DanteGSSAPI:
    """The cached GSS-API Dante build for the current Debian source version,
    building it first if needed. A failure is remembered for the session."""
    global _failure, _built
    if _built is not None:
        return _built
    if _failure is not None:
        raise _failure
    try:
        _built = _ensure()
    except DanteBuildError as e:
        _failure = e
        raise
    return _built


def _ensure() -> DanteGSSAPI:
    version = source_version()
    # One directory per recipe: a checkout with another recipe, run on the same
    # machine, keeps its own build instead of replacing this one under our feet.
    directory = CACHE_ROOT / f"{version}-recipe{RECIPE}"
    if _usable(directory):
        return DanteGSSAPI(version, directory)
    _make_cache_root()
    with open(CACHE_ROOT / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)       # another run may be building it
        if not _usable(directory):
            _build(version, directory)
    return DanteGSSAPI(version, directory)


def _usable(directory: Path) -> bool:
    try:
        stamp = json.loads((directory / "BUILD.json").read_text())
    except (OSError, ValueError):
        return False
    return (stamp.get("recipe") == RECIPE
            and all((directory / name).is_file() for name in (LIBRARY, "socksify", SERVER)))


# -- apt ---------------------------------------------------------------------

def _run(command: list[str], timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    env = {"PATH": SYSTEM_PATH, "LANG": "C.UTF-8", "HOME": os.environ.get("HOME", "/root"),
           "DEBIAN_FRONTEND": "noninteractive"}
    try:
        return subprocess.run(command, env=env, capture_output=True, text=True,
                              timeout=timeout, **kwargs)
    except (OSError, subprocess.SubprocessError) as e:
        raise DanteBuildError(f"{' '.join(command)}: {e}") from None


def _as_root(command: list[str]) -> list[str]:
    return command if os.geteuid() == 0 else ["sudo", "-n", *command]


def _check(result: subprocess.CompletedProcess, what: str) -> str:
    if result.returncode != 0:
        output = (result.stdout or "") + (result.stderr or "")
        raise DanteBuildError(f"{what} failed (exit {result.returncode}): "
                              f"{' '.join(map(str, result.args))}\n{output[-LOG_TAIL:]}")
    return result.stdout


def _apt_get(*args: str, timeout: float = 900) -> str:
    command = _as_root(["apt-get", "-q", "-y", "-o", "Dpkg::Use-Pty=0", *args])
    return _check(_run(command, timeout=timeout), "apt-get " + args[0])


def source_version() -> str:
    """The version `apt-get source dante` fetches (adds deb-src if needed)."""
    result = _run(["apt-get", "source", "--print-uris", "-q", SOURCE])
    if result.returncode != 0 and "deb-src" in result.stdout + result.stderr:
        _add_deb_src()
        result = _run(["apt-get", "source", "--print-uris", "-q", SOURCE])
    out = _check(result, "apt-get source --print-uris")
    match = re.search(rf"\s{SOURCE}_([^\s/]+)\.dsc\s", out)
    if not match:
        raise DanteBuildError(f"no {SOURCE} .dsc in `apt-get source --print-uris`:\n{out}")
    return match.group(1)


def _add_deb_src() -> None:
    """deb-src twins of this machine's Debian entries (same mirror, suites,
    components, keyring), in a file of our own, then `apt-get update`."""
    codename = _os_release().get("VERSION_CODENAME", "")
    stanzas = []
    sources_dir = Path("/etc/apt/sources.list.d")
    for path in sorted(sources_dir.glob("*.sources")):
        if path == DEB_SRC_FILE:
            continue
        for block in re.split(r"\n\s*\n", path.read_text()):
            fields = _deb822(block)
            if ("deb" in fields.get("Types", "").split()
                    and fields.get("Enabled", "yes").lower() != "no"
                    and _debian_suites(fields.get("Suites", "").split(), codename)):
                lines = ["Types: deb-src"] + [f"{key}: {value}" for key, value in fields.items()
                                              if key != "Types"]
                stanzas.append("\n".join(lines))
    one_line = []
    for path in [Path("/etc/apt/sources.list"), *sorted(sources_dir.glob("*.list"))]:
        if not path.is_file():
            continue
        for line in path.read_text().splitlines():
            words = line.split("#", 1)[0].split()
            if words[:1] == ["deb"]:
                rest = words[1:]
                if rest and rest[0].startswith("["):
                    while rest and not rest[0].endswith("]"):
                        rest = rest[1:]
                    rest = rest[1:]
                if len(rest) >= 2 and _debian_suites([rest[1]], codename):
                    one_line.append("deb-src" + line.split("#", 1)[0].strip()[3:])
    if not stanzas and not one_line:
        raise DanteBuildError(f"no Debian {codename!r} entries in /etc/apt to derive deb-src "
                              f"entries from; add deb-src lines for your Debian mirror")
    text = "# Added by socksd's tests/dante_gssapi.py (apt-get source dante).\n"
    text += "\n\n".join(stanzas) + "\n"
    if one_line:
        # deb822 cannot hold one-line entries; keep them in a .list twin.
        list_file = DEB_SRC_FILE.with_suffix(".list")
        _write_as_root(list_file, "\n".join(one_line) + "\n")
    if stanzas:
        _write_as_root(DEB_SRC_FILE, text)
    _apt_get("update", timeout=600)


def _deb822(block: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    key = None
    for line in block.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        if line[0].isspace() and key:
            fields[key] += "\n" + line
            continue
        key, _, value = line.partition(":")
        key = key.strip()
        fields[key] = value.strip()
    return fields


def _debian_suites(suites: list[str], codename: str) -> bool:
    return bool(codename) and any(s == codename or s.startswith(codename + "-")
                                  for s in suites)


def _os_release() -> dict[str, str]:
    values = {}
    for line in Path("/etc/os-release").read_text().splitlines():
        key, _, value = line.partition("=")
        values[key] = value.strip().strip('"')
    return values


def _write_as_root(path: Path, text: str) -> None:
    if os.geteuid() == 0:
        path.write_text(text)
    else:
        _check(subprocess.run(["sudo", "-n", "tee", str(path)], input=text, text=True,
                              capture_output=True), f"writing {path}")


def _make_cache_root() -> None:
    if CACHE_ROOT.is_dir() and os.access(CACHE_ROOT, os.W_OK):
        return
    if os.geteuid() == 0:
        CACHE_ROOT.mkdir(parents=True, exist_ok=True)
    else:
        _check(_run(["sudo", "-n", "install", "-d", "-o", str(os.getuid()), "-g",
                     str(os.getgid()), str(CACHE_ROOT)]), f"creating {CACHE_ROOT}")


# -- the build ---------------------------------------------------------------

def _build(version: str, directory: Path) -> None:
    started = time.monotonic()
    _apt_get("build-dep", "--no-install-recommends", f"{SOURCE}={version}")
    _apt_get("install", "--no-install-recommends", *EXTRA_DEBS)
    work = Path(tempfile.mkdtemp(prefix=".build-", dir=CACHE_ROOT))
    log_path = CACHE_ROOT / f"build-{version}.log"
    try:
        _check(_run(["apt-get", "source", "-q", f"{SOURCE}={version}"], cwd=work,
                    timeout=600), f"apt-get source {SOURCE}={version}")
        trees = [p for p in work.iterdir() if p.is_dir() and (p / "debian" / "rules").is_file()]
        if len(trees) != 1:
            raise DanteBuildError(f"apt-get source gave no single source tree in {work}: "
                                  f"{sorted(p.name for p in work.iterdir())}")
        tree = trees[0]
        rules = tree / "debian" / "rules"
        text = rules.read_text()
        if "--without-gssapi" not in text:
            raise DanteBuildError(f"{SOURCE} {version}: debian/rules no longer passes "
                                  "--without-gssapi; the recipe needs a look:\n" + text)
        rules.write_text(text.replace("--without-gssapi", "--with-gssapi"))
        jobs = os.cpu_count() or 1
        command = ["env", "-i", f"PATH={SYSTEM_PATH}", "LANG=C.UTF-8", f"HOME={work}",
                   f"DEB_BUILD_OPTIONS=nocheck parallel={jobs}",
                   "debian/rules", "build-arch"]
        with open(log_path, "w") as log:
            try:
                returncode = subprocess.run(_with_real_dev_null(command, work), cwd=tree,
                                            stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL,
                                            timeout=BUILD_TIMEOUT).returncode
            except (OSError, subprocess.SubprocessError) as e:
                returncode = str(e)
        build_log = log_path.read_text(errors="replace")
        if returncode != 0:
            raise DanteBuildError(f"building {SOURCE} {version} with GSS-API failed "
                                  f"({'exit ' if isinstance(returncode, int) else ''}"
                                  f"{returncode}); full log {log_path}; "
                                  f"tail:\n{build_log[-LOG_TAIL:]}")
        if not re.search(r"^GSSAPI:\s+Enabled", build_log, re.M):
            summary = re.search(r"^GSSAPI:.*$", build_log, re.M)
            raise DanteBuildError(f"{SOURCE} {version}: configure did not enable GSS-API "
                                  f"({summary.group(0) if summary else 'no GSSAPI line'}); "
                                  f"full log {log_path}; tail:\n{build_log[-LOG_TAIL:]}")
        library = tree / "dlib" / ".libs" / LIBRARY
        socksify = tree / "bin" / "socksify"
        # sockd links no libtool library of the tree: the binary itself, no wrapper.
        server = tree / "sockd" / SERVER
        for path in (library, socksify, server):
            if not path.is_file():
                raise DanteBuildError(f"{path} was not built; full log {log_path}; "
                                      f"tail:\n{build_log[-LOG_TAIL:]}")
        for binary in (library, server):
            needed = _check(_run(["readelf", "-d", str(binary)]), "readelf")
            if "libgssapi_krb5" not in needed:
                raise DanteBuildError(f"{binary} does not link libgssapi_krb5:\n{needed}")

        staging = Path(tempfile.mkdtemp(prefix=".new-", dir=CACHE_ROOT))
        shutil.copy2(library.resolve(), staging / LIBRARY)
        shutil.copy2(socksify, staging / "socksify")
        shutil.copy2(server, staging / SERVER)
        for name in ("socksify", SERVER):
            (staging / name).chmod(0o755)
        staging.chmod(0o755)
        shutil.copy2(log_path, staging / "build.log")
        (staging / "BUILD.json").write_text(json.dumps({
            "source": SOURCE, "version": version, "recipe": RECIPE,
            "configure": "debian/rules with --with-gssapi instead of --without-gssapi",
            "seconds": round(time.monotonic() - started, 1),
            "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }, indent=2) + "\n")
        if directory.exists():
            shutil.rmtree(directory)
        staging.rename(directory)
        log_path.unlink()
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _with_real_dev_null(command: list[str], work: Path) -> list[str]:
    """dante's configure generates sources with `cp /dev/null FILE` and `>>`.
    If /dev/null has been replaced by a regular file (a program that rotated
    a "log file" called /dev/null does that), whatever others wrote into it
    ends up in the generated C. Then build in a private mount namespace with
    a real null device bound over /dev/null; the machine's is left as it is."""
    if stat.S_ISCHR(os.stat("/dev/null").st_mode):
        return command
    if os.geteuid() != 0:
        raise DanteBuildError("/dev/null is not a character device on this machine, and "
                              "dante's configure cannot run correctly without one; "
                              "as root: rm /dev/null && mknod -m 666 /dev/null c 1 3")
    null = work / "null"
    os.mknod(null, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.chmod(null, 0o666)
    script = 'mount --bind "$1" /dev/null && shift && exec "$@"'
    return ["unshare", "--mount", "--propagation", "private",
            "sh", "-c", script, "sh", str(null), *command]
