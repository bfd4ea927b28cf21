"""The .deb, installed the way a user installs it, in a throwaway root.

`packaging/build-deb amd64` (run by scripts/test before pytest, or by hand)
makes target/debian/fieldmq_<version>_amd64.deb. Each test copies this
machine's root filesystem copy-on-write (overlayfs in a private mount
namespace, so nothing it does reaches the real system), chroots into it and
runs dpkg there: the maintainer scripts run for real, systemd is not running
(as in a container), and the gateway is started from the installed files as
the `fieldmq` user. Needs root (for the mount namespace and chroot)."""

import glob
import os
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest

from upstream_peer import free_port

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def deb():
    found = sorted(glob.glob(str(ROOT / "target" / "debian" / "fieldmq_*_amd64.deb")), key=os.path.getmtime)
    if not found:
        pytest.fail("no target/debian/fieldmq_*_amd64.deb: run `packaging/build-deb amd64` (scripts/test does)")
    return found[-1]


def sandbox(script: str, deb: str, tmp_path: Path, timeout=120) -> subprocess.CompletedProcess:
    """Runs `script` (sh) as root inside a copy-on-write copy of / with the
    .deb at /pkg/fieldmq.deb; returns the finished process (stdout+stderr)."""
    if os.geteuid() != 0:
        pytest.fail("the package tests need root (a private mount namespace and chroot): run scripts/test as root")
    for tool in ("unshare", "chroot", "dpkg"):
        if not shutil.which(tool):
            pytest.fail(f"{tool} is missing: apt-get install util-linux coreutils dpkg")
    work = tmp_path / "sandbox"
    work.mkdir()
    (work / "inner.sh").write_text("set -e\n" + textwrap.dedent(script))
    shutil.copy(deb, work / "fieldmq.deb")
    outer = textwrap.dedent(f"""\
        set -e
        W={work}
        mkdir -p $W/upper $W/work $W/root
        mount -t tmpfs tmpfs $W/upper
        mkdir -p $W/upper/u $W/upper/w
        mount -t overlay overlay -o lowerdir=/,upperdir=$W/upper/u,workdir=$W/upper/w $W/root
        mount -t proc proc $W/root/proc
        mount --rbind /dev $W/root/dev
        mount --rbind /sys $W/root/sys
        mount -t tmpfs tmpfs $W/root/run
        mount -t tmpfs tmpfs $W/root/tmp
        mkdir -p $W/root/pkg
        cp $W/fieldmq.deb $W/inner.sh $W/root/pkg/
        chroot $W/root /bin/sh /pkg/inner.sh
    """)
    return subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", outer],
        capture_output=True, text=True, timeout=timeout,
    )


def check(result):
    assert result.returncode == 0, f"exit {result.returncode}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
    return result.stdout


def test_the_deb_holds_what_a_user_needs(deb):
    """The package installs the stripped binary, the conffile, the unit, the
    docs with the example config and profiles, and a man page; it depends on
    libc and adduser and only recommends bluez."""
    info = subprocess.run(["dpkg-deb", "-I", deb], capture_output=True, text=True, check=True).stdout
    files = subprocess.run(["dpkg-deb", "-c", deb], capture_output=True, text=True, check=True).stdout
    for path in ["./usr/bin/fieldmq", "./etc/fieldmq/fieldmq.toml", "./etc/fieldmq/acl",
                 "./usr/share/doc/fieldmq/acl.example", "./lib/systemd/system/fieldmq.service",
                 "./usr/share/doc/fieldmq/example.toml", "./usr/share/doc/fieldmq/copyright",
                 "./usr/share/doc/fieldmq/profiles/eastron-sdm630.toml", "./usr/share/man/man1/fieldmq.1.gz"]:
        assert path in files, f"{path} missing from the package:\n{files}"
    assert "Architecture: amd64" in info
    assert "Depends: libc6 (>= 2.34), libgcc-s1, adduser" in info
    assert "Recommends: bluez" in info
    assert "conffiles" in info and "postinst" in info and "postrm" in info
    listed = subprocess.run(["sh", "-c", f"dpkg-deb --ctrl-tarfile {deb} | tar -xO ./conffiles"],
                            capture_output=True, text=True, check=True).stdout.split()
    assert listed == ["/etc/fieldmq/fieldmq.toml", "/etc/fieldmq/acl"], listed
    out = subprocess.run(["dpkg-deb", "--fsys-tarfile", deb], capture_output=True, check=True).stdout
    import io, tarfile
    with tarfile.open(fileobj=io.BytesIO(out)) as tar:
        binary = tar.extractfile("./usr/bin/fieldmq").read()
    assert b".symtab" not in binary, "the binary is not stripped"


def test_install_run_upgrade_remove_purge(deb, tmp_path):
    """The whole life of the package on a machine without a running systemd:
    install creates the `fieldmq` user with /var/lib/fieldmq, in dialout
    where that group exists, and enables the service; the installed config
    runs as that user out of the box (edited to a free port: the test must
    not take 1883); an upgrade with a broken edited config reports the
    errors and keeps config and data; remove keeps config and data; purge
    deletes both and the user."""
    script = r"""
    getent group dialout >/dev/null || groupadd --system dialout
    dpkg -i /pkg/fieldmq.deb
    echo "user: $(id fieldmq)"
    echo "state: $(stat -c '%U:%G %a' /var/lib/fieldmq)"
    echo "config: $(stat -c '%U:%G %a' /etc/fieldmq/fieldmq.toml)"
    test -L /etc/systemd/system/multi-user.target.wants/fieldmq.service && echo "enabled: yes"
    fieldmq --version
    systemd-analyze verify /lib/systemd/system/fieldmq.service && echo "unit: verified"
    fieldmq check --config /etc/fieldmq/fieldmq.toml >/dev/null 2>/tmp/check.err && echo "packaged config: valid"
    test -s /tmp/check.err || echo "packaged config: no warning"
    echo "acl: $(stat -c '%U:%G %a' /etc/fieldmq/acl)"
    echo "passwd: $(stat -c '%U:%G %a %s' /etc/fieldmq/passwd)"

    # Out of the box, as the service user (port changed: 1883 may be taken here).
    sed -i 's/0.0.0.0:1883/127.0.0.1:PORT/' /etc/fieldmq/fieldmq.toml
    setpriv --reuid fieldmq --regid fieldmq --init-groups \
        fieldmq run --config /etc/fieldmq/fieldmq.toml 2>/tmp/run.log &
    pid=$!
    sleep 2
    # Safe by default: anonymous clients read fieldmq/#, and write nothing.
    mosquitto_sub -h 127.0.0.1 -p PORT -t 'fieldmq/#' -C 1 -W 5 >/dev/null && echo "anonymous: reads fieldmq/#"
    mosquitto_sub -h 127.0.0.1 -p PORT -t '#' -C 1 -W 2 2>&1 | grep -q denied && echo "anonymous: # denied"
    mosquitto_pub -h 127.0.0.1 -p PORT -V mqttv5 -q 1 -t fieldmq/x/set/y -m 1 -d 2>&1 | grep -q 'RC:135' && echo "anonymous: write denied"
    # A user added with fieldmq passwd and granted by the ACL may write, after a reload.
    echo 's3cret' | fieldmq passwd /etc/fieldmq/passwd ops 2>/dev/null
    echo "passwd after: $(stat -c '%U:%G %a' /etc/fieldmq/passwd)"
    printf 'user ops\ntopic readwrite fieldmq/#\n' >> /etc/fieldmq/acl
    kill -HUP $pid; sleep 1
    mosquitto_pub -h 127.0.0.1 -p PORT -V mqttv5 -u ops -P s3cret -q 1 -t fieldmq/x/set/y -m 1 -d 2>&1 | grep -q 'RC:16\|RC:0' && echo "ops: write allowed"
    kill -TERM $pid; wait $pid && echo "run: exit 0"
    grep -o 'MQTT listener ready' /tmp/run.log | head -1
    ls /var/lib/fieldmq
    echo "state files: $(stat -c '%U' /var/lib/fieldmq/* | sort -u | tr '\n' ' ')"

    # An upgrade over a broken edit: reported, config and data kept.
    echo 'bogus = true' >> /etc/fieldmq/fieldmq.toml
    dpkg -i /pkg/fieldmq.deb 2>/tmp/upgrade.err
    grep -c 'unknown field' /tmp/upgrade.err | sed 's/^/upgrade errors reported: /'
    grep -q '^bogus = true' /etc/fieldmq/fieldmq.toml && echo "upgrade kept the edited config"
    test -e /var/lib/fieldmq/broker.state && echo "upgrade kept the data"

    dpkg -r fieldmq
    test ! -e /usr/bin/fieldmq && echo "removed: binary gone"
    test -e /etc/fieldmq/fieldmq.toml && echo "removed: config kept"
    test -e /var/lib/fieldmq/broker.state && echo "removed: data kept"
    dpkg -P fieldmq
    test ! -e /etc/fieldmq && test ! -e /var/lib/fieldmq && echo "purged: config and data gone"
    getent passwd fieldmq || echo "purged: user gone"
    """
    out = check(sandbox(script.replace("PORT", str(free_port())), deb, tmp_path))
    assert "dialout" in out.split("user:")[1].splitlines()[0], out
    assert "state: fieldmq:fieldmq 750" in out, out
    assert "config: root:fieldmq 640" in out, out
    assert "enabled: yes" in out, out
    assert "unit: verified" in out, out
    assert "packaged config: valid" in out and "packaged config: no warning" in out, out
    assert "acl: root:fieldmq 640" in out and "passwd: root:fieldmq 640 0" in out, out
    for line in ["anonymous: reads fieldmq/#", "anonymous: # denied", "anonymous: write denied",
                 "passwd after: root:fieldmq 640", "ops: write allowed"]:
        assert line in out, out
    assert "run: exit 0" in out and "MQTT listener ready" in out, out
    assert "broker.state" in out and "state files: fieldmq" in out, out
    assert "upgrade errors reported: 1" in out, out
    assert "upgrade kept the edited config" in out and "upgrade kept the data" in out, out
    for line in ["removed: binary gone", "removed: config kept", "removed: data kept",
                 "purged: config and data gone", "purged: user gone"]:
        assert line in out, out
