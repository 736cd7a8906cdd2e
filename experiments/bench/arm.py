"""`fediomt bench arm`: the device tier on aarch64, in FULL-SYSTEM emulation (issue 22).

qemu-user emulates single processes on the host's kernel (the `train` segfault it showed is a LiteRT 1.4.0
aarch64 defect that this reproduced too: docs/litert-aarch64-train-crash.md); for the whole device tier (pip,
the agent, its networking) this boots a real arm64 Linux: `qemu-system-aarch64 -M virt -cpu cortex-a72`, Debian bookworm
arm64 built with `debootstrap` from the host's apt mirror, Debian's arm64 kernel and initramfs. Inside the guest:

1. `python3 -m venv` + `pip install fediomt[device]` (this checkout's wheel, served by the host; its dependencies'
   aarch64 wheels from the host's package index, reached through qemu's user networking); install size,
2. import time and RSS of the device runtime; one fixed-seed DP-SGD step of each trainable prebuilt bundle (inputs
   generated on the host, the same step run on the host: max abs weight difference); int8 student inference,
3. `fediomt device run` against the host's Mosquitto (10.0.2.2 in the guest), a real x86 `fediomt edge run` on the
   host and a scripted cloud above it: `rounds` federated rounds of DP-SGD, each update accepted by the edge
   (its ack) and the edge's signed aggregate checked against the device's own delta.

Image (cached in $FEDIOMT_ARM_CACHE, default ~/.cache/fediomt-arm; never in git): `base.img` (ext4, ~3 GB sparse),
`vmlinuz`, `initrd.img`, `recipe.sha256` (rebuilt when the recipe below changes). Each run boots a throw-away qcow2
overlay, so the base image stays pristine. Building needs root, `debootstrap`, `qemu-user-static` with binfmt_misc
(the arm64 second stage and the kernel's postinst run in a chroot) and `mkfs.ext4 -d`; booting needs only
`qemu-system-aarch64` (apt-get install qemu-system-arm). All timings are EMULATED cortex-a72 (TCG on the x86 host):
upper bounds, not Raspberry Pi figures.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SUITE = "bookworm"
# the guest's own packages: CPython 3.11 as on Pi OS bookworm, the venv and pip, TLS roots, `ip`, `modprobe`
PACKAGES = ["python3", "python3-venv", "python3-pip", "ca-certificates", "iproute2", "kmod", "procps"]
KERNEL = ["linux-image-arm64", "initramfs-tools"]
# modules the initramfs loads explicitly (minbase has no udev to load them): disk, network, entropy, filesystem
MODULES = ["virtio_pci", "virtio_mmio", "virtio_blk", "virtio_net", "virtio_rng", "ext4"]
IMAGE_MB = 3072

GUEST_INIT = r"""#!/bin/sh
# PID 1 of the fediomt-arm guest: mount, configure qemu user networking, fetch and run the host's job, power off.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm; mount -t devpts devpts /dev/pts; mount -t tmpfs shm /dev/shm; mount -t tmpfs tmp /tmp
mount -o remount,rw /
for m in virtio_net virtio_rng; do modprobe $m 2>/dev/null; done
hostname fediomt-arm
ip link set lo up; ip link set eth0 up; ip addr add 10.0.2.15/24 dev eth0; ip route add default via 10.0.2.2
url=$(sed -n 's/.*fediomt\.job=\([^ ]*\).*/\1/p' /proc/cmdline)
echo "FEDIOMT-GUEST-UP $(uname -m) $(date -u +%FT%TZ) job=$url"
GET='import sys, urllib.request as u; open(sys.argv[2], "wb").write(u.urlopen(sys.argv[1], timeout=60).read())'
if [ -n "$url" ] && python3 -c "$GET" "$url" /tmp/job.sh; then
  sh /tmp/job.sh; echo "FEDIOMT-JOB-EXIT $?"
else
  echo "FEDIOMT-JOB-EXIT fetch-failed"
fi
sync; echo o > /proc/sysrq-trigger; sleep 60
"""


def cache_dir() -> Path:
    return Path(os.environ.get("FEDIOMT_ARM_CACHE", Path.home() / ".cache" / "fediomt-arm"))


def host_mirror() -> str:
    """The Debian mirror the host's apt uses (deb822 or one-line sources), else deb.debian.org."""
    for path in [Path("/etc/apt/sources.list.d/debian.sources"), Path("/etc/apt/sources.list")]:
        if path.exists():
            match = re.search(r"^(?:URIs:|deb)\s+(\S*/debian)/?\s", path.read_text(), re.M)
            if match:
                return match.group(1)
    return "http://deb.debian.org/debian"


def recipe() -> str:
    return "\n".join([SUITE, host_mirror(), *PACKAGES, *KERNEL, "MODULES=list", *MODULES, str(IMAGE_MB),
                      GUEST_INIT])


def _sh(cmd: list[str], log, **kw) -> None:
    print("+", " ".join(cmd), file=log, flush=True)
    subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT, **kw)


def ensure_binfmt() -> None:
    """qemu-user-static's aarch64 handler in binfmt_misc (the chroot's arm64 programs run through it)."""
    misc = Path("/proc/sys/fs/binfmt_misc")
    if not (misc / "register").exists():
        subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(misc)], check=True)
    if not (misc / "qemu-aarch64").exists():
        subprocess.run(["update-binfmts", "--enable", "qemu-aarch64"], check=True)


def build_image(cache: Path, log=sys.stderr) -> dict:
    """Build base.img + vmlinuz + initrd.img into `cache` (minutes to tens of minutes: the arm64 second stage runs
    under qemu-user). Returns timings."""
    for tool in ("debootstrap", "mkfs.ext4", "chroot"):
        if not shutil.which(tool):
            raise RuntimeError(f"{tool} missing: apt-get install debootstrap qemu-user-static binfmt-support "
                               "e2fsprogs qemu-system-arm")
    ensure_binfmt()
    cache.mkdir(parents=True, exist_ok=True)
    root = cache / "rootfs"
    if root.exists():
        _sh(["rm", "-rf", "--one-file-system", str(root)], log)
    t0 = time.perf_counter()
    _sh(["debootstrap", "--arch=arm64", "--variant=minbase", "--include=" + ",".join(PACKAGES), SUITE, str(root),
         host_mirror()], log)
    t_boot = time.perf_counter() - t0
    (root / "etc/initramfs-tools").mkdir(parents=True, exist_ok=True)
    (root / "etc/initramfs-tools/modules").write_text("\n".join(MODULES) + "\n")
    # only those modules (and their dependencies): MODULES=most copies ~3,000 modules, one emulated process each
    (root / "etc/initramfs-tools/conf.d").mkdir(parents=True, exist_ok=True)
    (root / "etc/initramfs-tools/conf.d/fediomt").write_text("MODULES=list\n")
    (root / "etc/resolv.conf").write_text("nameserver 10.0.2.3\n")   # qemu user networking's DNS
    (root / "etc/hostname").write_text("fediomt-arm\n")
    (root / "etc/fstab").write_text("/dev/vda / ext4 rw,relatime 0 1\n")
    (root / "etc/apt/sources.list").write_text(f"deb {host_mirror()} {SUITE} main\n")
    (root / "etc/pip.conf").write_text("[global]\ndisable-pip-version-check = true\n")
    init = root / "sbin/fediomt-init"
    init.write_text(GUEST_INIT)
    init.chmod(0o755)
    subprocess.run(["mount", "-t", "proc", "proc", str(root / "proc")], check=True)
    try:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        _sh(["chroot", str(root), "apt-get", "install", "-y", "--no-install-recommends", *KERNEL], log, env=env)
        _sh(["chroot", str(root), "apt-get", "clean"], log)
    finally:
        subprocess.run(["umount", str(root / "proc")], check=False)
    kernels = sorted((root / "boot").glob("vmlinuz-*"))
    initrds = sorted((root / "boot").glob("initrd.img-*"))
    if not kernels or not initrds:
        raise RuntimeError(f"no kernel/initrd in {root / 'boot'}")
    shutil.copy(kernels[-1], cache / "vmlinuz")
    shutil.copy(initrds[-1], cache / "initrd.img")
    image = cache / "base.img"
    image.unlink(missing_ok=True)
    _sh(["mkfs.ext4", "-q", "-L", "fediomt-arm", "-d", str(root), str(image), f"{IMAGE_MB}M"], log)
    _sh(["rm", "-rf", "--one-file-system", str(root)], log)
    (cache / "recipe.sha256").write_text(hashlib.sha256(recipe().encode()).hexdigest() + "\n")
    return {"debootstrap_s": round(t_boot, 1), "build_s": round(time.perf_counter() - t0, 1)}


def image_ready(cache: Path) -> bool:
    stamp = cache / "recipe.sha256"
    return all((cache / f).exists() for f in ("base.img", "vmlinuz", "initrd.img")) and stamp.exists() and \
        stamp.read_text().strip() == hashlib.sha256(recipe().encode()).hexdigest()


# ------------------------------------------------------------------ the guest's job (a shell script it fetches)
JOB = r"""#!/bin/sh
# fetched and run by /sbin/fediomt-init inside the aarch64 guest; @HOST@ = the host's HTTP server
# @W@ = its work directory, @V@ = the venv (the guest: /root, /opt/fediomt; --local: temporary folders)
H=@HOST@ W=@W@ V=@V@
stage() { echo "FEDIOMT-STAGE $1 $(date +%s.%N)"; }
GET='import sys, urllib.request as u; open(sys.argv[2], "wb").write(u.urlopen(sys.argv[1], timeout=60).read())'
PUT='import sys, urllib.request as u; u.urlopen(u.Request(sys.argv[1], open(sys.argv[2], "rb").read(), method="PUT"))'
get() { python3 -c "$GET" "$H/$1" "$2"; }
put() { python3 -c "$PUT" "$H/up/$1" "$2"; }
cd $W
stage venv
python3 -m venv $V || exit 10
stage pip
get ca.pem $W/ca.pem   # the CA bundle the host's pip trusts (its `cert`): the same index, the same trust
$V/bin/pip install --progress-bar off --cert $W/ca.pem --index-url @INDEX@ --find-links $H/wheels/ \
  --trusted-host 10.0.2.2 "fediomt[device]" > $W/pip.log 2>&1   # trusted: only this checkout's wheel, over HTTP
rc=$?; tail -3 $W/pip.log; put pip.log $W/pip.log
[ $rc = 0 ] || exit 11
stage installed
$V/bin/pip list --format=freeze > $W/freeze.txt; put freeze.txt $W/freeze.txt
du -sk $V > $W/du.txt; du -sk $V/lib/python3*/site-packages/* | sort -n | tail -8 >> $W/du.txt
put du.txt $W/du.txt; cat $W/du.txt
stage probe
get inputs.npz $W/inputs.npz
$V/bin/python -m experiments.bench.arm_guest $W/inputs.npz $W/probe
for f in $W/probe/*.npz; do put probe-$(basename $f) $f; done; put probe-guest.json $W/probe/guest.json
stage agent
get device.tar $W/device.tar && mkdir -p $W/dev && tar -xf $W/device.tar -C $W/dev
$V/bin/fediomt device run --config $W/dev/device.toml > $W/agent.log 2>&1 &
agent=$!
echo started > $W/ready; put ready $W/ready
while ! get done $W/done 2>/dev/null; do
  kill -0 $agent 2>/dev/null || break
  sleep 5
done
grep VmHWM /proc/$agent/status > $W/agent_rss.txt; put agent_rss.txt $W/agent_rss.txt
kill -TERM $agent; wait $agent; echo "agent exit $?"
put agent.log $W/agent.log
stage end
"""


def _host_index() -> str:
    """The index the host's pip uses (its config, PIP_INDEX_URL), else PyPI: the guest reaches it through qemu's
    user networking (NAT), like any host program."""
    url = os.environ.get("PIP_INDEX_URL", "")
    if not url:
        got = subprocess.run([sys.executable, "-m", "pip", "config", "get", "global.index-url"],
                             capture_output=True, text=True)
        url = got.stdout.strip() if got.returncode == 0 else ""
    return url or "https://pypi.org/simple"


def _host_cert() -> Path:
    """The CA bundle the host's pip verifies the index with (PIP_CERT, its config's `cert`), else certifi's."""
    path = os.environ.get("PIP_CERT", "")
    if not path:
        got = subprocess.run([sys.executable, "-m", "pip", "config", "get", "global.cert"],
                             capture_output=True, text=True)
        path = got.stdout.strip() if got.returncode == 0 else ""
    if not path:
        import certifi

        path = certifi.where()
    return Path(path)


class _Server:
    """GET files under `root`, PUT into root/up/: how the guest fetches its job and returns its results."""

    def __init__(self, root: Path) -> None:
        import functools
        import http.server
        import threading

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_PUT(self) -> None:  # noqa: N802 - http.server's naming
                name = Path(self.path).name
                data = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                (root / "up").mkdir(exist_ok=True)
                (root / "up" / name).write_bytes(data)
                self.send_response(201)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                                     functools.partial(Handler, directory=str(root)))
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()


TRAINABLE = ["wearable_cnn", "har_mlp", "vitals_mlp"]
STUDENT = "har_mlp_int8"
SEED = 22
STEP_TOLERANCE = 1e-4   # max abs weight difference of one fixed-seed DP-SGD step, aarch64 vs x86 (issue 22)


def _inputs(path: Path) -> dict:
    """Fixed-seed inputs of one DP-SGD step per trainable bundle and a batch for the int8 student; returns the
    host's (x86) results of the same computations."""
    import numpy as np

    from device.runtime import Int8Model, TrainableModel
    from experiments.bench.arm_guest import _bundle

    rng = np.random.default_rng(SEED)
    arrays, host = {}, {}
    for name in TRAINABLE:
        bundle = _bundle(name)
        model = TrainableModel(bundle.model_bytes, bundle.manifest)
        x = rng.normal(size=(model.batch_size, *model.input_shape)).astype(np.float32)
        y = rng.integers(0, int(bundle.manifest["n_classes"]), model.batch_size).astype(np.int32)
        noise = rng.standard_normal(model.n_params, dtype=np.float32)
        hyper = np.array([0.05, 1.0, 1.1], np.float32)       # lr, clip, noise multiplier: DP-SGD on
        arrays.update({f"{name}/x": x, f"{name}/y": y, f"{name}/noise": noise, f"{name}/hyper": hyper})
        before = model.get_flat()
        model.train_step(x, y, noise, *(float(v) for v in hyper))
        host[name] = {"before": before, "after": model.get_flat()}
    student = _bundle(STUDENT)
    x = rng.normal(size=(32, *student.manifest["input"]["shape"])).astype(np.float32)
    arrays[f"{STUDENT}/x"] = x
    host[STUDENT] = {"logits": Int8Model(student.model_bytes).infer(x)}
    # the runtime's defaults, then (bisecting a crash) without the default delegate and with reference kernels
    arrays["tasks"] = np.array([f"step:{n}" for n in TRAINABLE] + [f"step-nodelegate:{n}" for n in TRAINABLE]
                               + [f"step-ref:{n}" for n in TRAINABLE] + [f"infer:{STUDENT}"])
    np.savez(path, **arrays)
    return host


def probe_ok(figures: dict) -> bool:
    """Every probe task ran; each trainable step equals x86's to STEP_TOLERANCE; the student's argmax equals x86's."""
    rows = {k: v for k, v in figures.items() if ":" in k and isinstance(v, dict)}
    steps = [v for k, v in rows.items() if k.startswith("step")]
    infers = [v for k, v in rows.items() if k.startswith("infer:")]
    return bool(steps and infers) and all(v.get("returncode") == 0 for v in rows.values()) and \
        all(v.get("max_abs_diff_vs_x86", 1.0) <= STEP_TOLERANCE for v in steps) and \
        all(v.get("argmax_agreement") == 1.0 for v in infers)


def _stages(console: str) -> dict[str, float]:
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"FEDIOMT-STAGE (\S+) ([0-9.]+)", console)}


def run(args: argparse.Namespace) -> dict:
    """`fediomt bench arm`: build (or reuse) the image, boot it, install, probe, federate; the figures."""
    import json
    import tarfile
    import tempfile

    import numpy as np

    from experiments.mosquitto import MosquittoBroker
    from experiments.sandbox import provision
    from protocol.compression import decode_update
    from protocol.messages import (
        Ack,
        DeviceUpdate,
        EdgeAggregate,
        RoundAnnouncement,
        TrainingPlan,
        decode,
        encode,
        global_model,
        sign_message,
        verify_message,
    )
    from protocol.signing import generate_signing_key, load_public_key, save_private_key, save_public_key
    from protocol.table import print_table
    from protocol.topics import ANY, CLOUD_MODEL, CLOUD_ROUND, ack_topic, aggregate_topic, matches, update_topic

    rounds = getattr(args, "rounds", None) or (1 if getattr(args, "quick", False) else 3)
    timeout_s = float(getattr(args, "timeout", None) or 5400)
    cache = cache_dir()
    figures: dict = {"emulated": "qemu-system-aarch64 -M virt -cpu cortex-a72 (TCG on x86_64): timings are upper "
                                 "bounds, not Raspberry Pi figures"}
    if not image_ready(cache) and not getattr(args, "local", False):
        print(f"building the arm64 image in {cache} (once)", flush=True)
        figures["image_build"] = build_image(cache, sys.stdout)
    qemu = shutil.which("qemu-system-aarch64")
    if not qemu:
        raise RuntimeError("qemu-system-aarch64 missing: apt-get install qemu-system-arm")
    workdir = Path(tempfile.mkdtemp(prefix="fediomt-bench-arm-"))
    serve = workdir / "serve"
    (serve / "wheels").mkdir(parents=True)
    print(f"work directory {workdir}", flush=True)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(serve / "wheels"), str(REPO)], check=True)
    host = _inputs(serve / "inputs.npz")
    shutil.copy(_host_cert(), serve / "ca.pem")
    server = _Server(serve)
    local = bool(getattr(args, "local", False))   # the same job on this machine, no VM: checks the harness
    if local:
        figures["emulated"] = "NO: --local ran the guest's job on this x86 host (a check of the harness)"
    host_ip = "127.0.0.1" if local else "10.0.2.2"   # the host as the guest sees it (qemu user networking)
    guest_host = f"http://{host_ip}:{server.port}"
    w, v = (str(workdir / "local"), str(workdir / "local" / "venv")) if local else ("/root", "/opt/fediomt")
    (serve / "job.sh").write_text(JOB.replace("@HOST@", guest_host).replace("@INDEX@", _host_index())
                                  .replace("@W@", w).replace("@V@", v))
    if not local:
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(cache / "base.img"), "-F", "raw",
                        str(workdir / "overlay.qcow2")], check=True)
    console = workdir / "console.log"
    broker = MosquittoBroker(workdir=workdir / "mosquitto").start()
    procs: list[subprocess.Popen] = []
    try:
        # the x86 edge: a real `fediomt edge run`, the device enrolled; the scripted cloud publishes on fl/cloud/*
        fed = workdir / "fed"
        (fed / "enrolment").mkdir(parents=True)
        cloud_key, edge_key = generate_signing_key(), generate_signing_key()
        save_public_key(cloud_key.public_key(), fed / "cloud.pub")
        save_private_key(edge_key, fed / "edge.key")
        prebuilt = REPO / "firmware_models" / "prebuilt"
        rng = np.random.default_rng(SEED)
        n = 96
        x = rng.normal(size=(n, 100, 6)).astype(np.float32)
        y = rng.integers(0, 7, n)
        dev = provision(workdir / "device", "arm1", "e1", prebuilt / "wearable_cnn",
                        prebuilt / "DEVELOPMENT_ONLY_signing.key.pub", fed / "cloud.pub", x, y, broker.port,
                        broker_host=host_ip, capability={"compute_class": "pi"})
        shutil.copy(prebuilt / "DEVELOPMENT_ONLY_signing.key.pub", dev.parent / "bundle.pub")
        shutil.copy(fed / "cloud.pub", dev.parent / "cloud.pub")
        text = re.sub(r'bundle_pubkey = ".*"', 'bundle_pubkey = "bundle.pub"', dev.read_text())
        dev.write_text(re.sub(r'cloud_pubkey = ".*"', 'cloud_pubkey = "cloud.pub"', text))
        shutil.copy(dev.parent / "arm1.pub", fed / "enrolment" / "arm1.pub")
        with tarfile.open(serve / "device.tar", "w") as tar:
            for item in dev.parent.iterdir():
                tar.add(item, arcname=item.name)
        import tomli_w

        (fed / "edge.toml").write_bytes(tomli_w.dumps({
            "edge_id": "e1", "state_dir": "state", "enrolment_dir": "enrolment", "signing_key": "edge.key",
            "cloud_public_key": "cloud.pub", "tick_s": 0.2, "broker": {"host": "127.0.0.1", "port": broker.port},
            "rounds": {"quorum": 1.0}}).encode())
        edge_log = open(workdir / "edge.log", "wb")  # noqa: SIM115 - closed below
        procs.append(subprocess.Popen([sys.executable, "-m", "fediomt", "edge", "run", "--config",
                                       str(fed / "edge.toml")], cwd=REPO, stdout=edge_log, stderr=edge_log))
        import paho.mqtt.client as mqtt

        seen: list[tuple[str, bytes]] = []
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-arm-cloud")
        client.on_message = lambda _c, _u, msg: seen.append((msg.topic, msg.payload))
        client.connect("127.0.0.1", broker.port)
        for topic in (aggregate_topic("e1"), update_topic("e1", ANY), ack_topic("e1", ANY)):
            client.subscribe(topic, qos=1)
        client.loop_start()

        t_boot = time.monotonic()
        cmdline = (f"root=/dev/vda rw console=ttyAMA0 init=/sbin/fediomt-init fediomt.job={guest_host}/job.sh "
                   "net.ifnames=0 quiet loglevel=3")   # eth0, as the init expects
        if local:
            Path(w).mkdir(parents=True)
            console.write_text("FEDIOMT-GUEST-UP local\n")
            procs.append(subprocess.Popen(["sh", str(serve / "job.sh")], stdout=open(console, "ab"),  # noqa: SIM115
                                          stderr=subprocess.STDOUT, start_new_session=True))
        else:
            smp = str(getattr(args, "smp", None) or 2)
            procs.append(subprocess.Popen([
                qemu, "-M", "virt", "-cpu", "cortex-a72", "-smp", smp, "-m", "2048",
                "-kernel", str(cache / "vmlinuz"), "-initrd", str(cache / "initrd.img"), "-append", cmdline,
                "-drive", f"file={workdir / 'overlay.qcow2'},if=none,id=hd0,format=qcow2",
                "-device", "virtio-blk-pci,drive=hd0", "-netdev", "user,id=n0",
                "-device", "virtio-net-pci,netdev=n0,romfile=", "-device", "virtio-rng-pci",
                "-display", "none", "-monitor", "none", "-serial", f"file:{console}", "-no-reboot"],
                stdout=subprocess.DEVNULL, stderr=open(workdir / "qemu.err", "wb")))  # noqa: SIM115
        deadline = time.monotonic() + timeout_s
        up = serve / "up"

        def wait(cond, what: str) -> None:
            while not cond():
                if procs[-1].poll() is not None:
                    raise RuntimeError(f"the guest powered off before {what}; see {console}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no {what} within {timeout_s:.0f} s; see {console}")
                time.sleep(2)

        def log(msg: str) -> None:
            print(f"[{time.monotonic() - t_boot:7.1f} s] {msg}", flush=True)

        wait(lambda: console.exists() and "FEDIOMT-GUEST-UP" in console.read_text(errors="replace"), "boot")
        figures["boot_s"] = round(time.monotonic() - t_boot, 1)
        log("guest up")
        wait(lambda: (up / "probe-guest.json").exists() or
             "FEDIOMT-JOB-EXIT" in console.read_text(errors="replace"), "probe results")
        probe_file = up / "probe-guest.json"
        if probe_file.exists():
            probe = json.loads(probe_file.read_text())
            figures["guest"] = {"machine": probe["machine"], "python": probe["python"],
                                "import_device_agent_s": probe["import_device_agent_s"],
                                "python_startup_s": probe["python_startup_s"]}
            for entry in probe["tasks"]:
                name, ok = entry["name"], entry["returncode"] == 0
                row = {k: entry.get(k) for k in ("returncode", "interpreter", "load_s", "first_step_s", "step_s",
                                                  "infer_batch_s", "infer_window_s", "peak_rss_mb")}
                result = up / f"probe-{entry['task']}-{name}.npz"
                if ok and result.exists():
                    got = np.load(result)
                    if entry["task"].startswith("step"):
                        ref = host[name]
                        row["max_abs_diff_vs_x86"] = float(np.max(np.abs(got["weights"] - ref["after"])))
                        row["max_abs_step"] = float(np.max(np.abs(ref["after"] - ref["before"])))
                    else:
                        row["max_abs_logit_diff_vs_x86"] = float(np.max(np.abs(got["logits"] - host[name]["logits"])))
                        row["argmax_agreement"] = float(np.mean(np.argmax(got["logits"], 1) ==
                                                                np.argmax(host[name]["logits"], 1)))
                else:
                    row["stderr_tail"] = entry.get("stderr_tail", "")[-1200:]
                figures[f"{entry['task']}:{name}"] = row
            log(f"probe done: {json.dumps({k: v for k, v in figures.items() if ':' in k})}")
        figures["probe_ok"] = probe_ok(figures)
        text = console.read_text(errors="replace")
        if "FEDIOMT-JOB-EXIT" in text:
            raise RuntimeError(f"the guest job ended early: {text[-3000:]}")
        if (up / "du.txt").exists():
            figures["install_kb"] = int((up / "du.txt").read_text().split()[0])
        wait(lambda: (up / "ready").exists(), "device agent start")
        log("device agent started in the guest")
        weights = host["wearable_cnn"]["before"]
        plan = TrainingPlan(lr=0.05, local_epochs=1, batch_size=32, clip=1.0, noise_mult=1.1)   # DP-SGD on
        dev_pub = load_public_key(fed / "enrolment" / "arm1.pub")
        figures["rounds"] = []
        for r in range(1, rounds + 1):
            t = time.monotonic()
            client.publish(CLOUD_MODEL, encode(sign_message(global_model("wearable_cnn", r, weights),
                                                                 cloud_key)), qos=1, retain=True)
            ann = RoundAnnouncement(r, "wearable_cnn", r, "fedavg", time.time() + 1800, plan, {}, edges=["e1"])
            client.publish(CLOUD_ROUND, encode(sign_message(ann, cloud_key)), qos=1, retain=True)

            def of(topic_filter: str, cls, r=r):
                out = []
                for topic, payload in list(seen):
                    if matches(topic_filter, topic):
                        msg = decode(payload, expect=cls)
                        if msg.round_id == r:
                            out.append(msg)
                return out

            wait(lambda: of(aggregate_topic("e1"), EdgeAggregate), f"round {r}'s aggregate")
            (agg,) = of(aggregate_topic("e1"), EdgeAggregate)
            verify_message(agg, edge_key.public_key())
            updates, acks = of(update_topic("e1", ANY), DeviceUpdate), of(ack_topic("e1", ANY), Ack)
            row = {"round": r, "round_s": round(time.monotonic() - t, 1), "aggregate_devices": agg.device_ids,
                   "acks": [("accepted" if a.accepted else f"rejected {a.reason} {a.detail}") for a in acks]}
            if updates:
                update = updates[0]
                verify_message(update, dev_pub)
                dev_delta = decode_update(update.delta, update.n_params)
                row.update(local_steps=update.local_steps, update_bytes=len(update.delta),
                           epsilon=round(update.privacy.epsilon, 3), noise_mult=update.privacy.noise_mult)
            if agg.significant:
                agg_delta = decode_update(agg.delta, agg.n_params)
                if updates:
                    row["max_abs_aggregate_minus_device_delta"] = float(np.max(np.abs(agg_delta - dev_delta)))
                weights = weights + agg_delta
            figures["rounds"].append(row)
            log(f"round {r}: {row}")
        (serve / "done").write_text("done\n")
        wait(lambda: (up / "agent.log").exists(), "the agent's log")
        try:
            procs[-1].wait(300)
        except subprocess.TimeoutExpired:
            pass
        text = (up / "agent.log").read_text(errors="replace")
        figures["agent_errors"] = [line for line in text.splitlines() if '"level": "error"' in line][:5]
        if (up / "agent_rss.txt").exists() and (up / "agent_rss.txt").read_text().split():
            figures["agent_peak_rss_mb"] = round(int((up / "agent_rss.txt").read_text().split()[1]) / 1024, 1)
        stages = _stages(console.read_text(errors="replace"))
        if {"pip", "installed"} <= stages.keys():
            figures["pip_install_s"] = round(stages["installed"] - stages["pip"], 1)
        if {"probe", "agent"} <= stages.keys():
            figures["probe_s"] = round(stages["agent"] - stages["probe"], 1)
        figures["total_s"] = round(time.monotonic() - t_boot, 1)
        ok = (len(figures["rounds"]) == rounds and all(
            row["acks"] and all(a == "accepted" for a in row["acks"]) and row["aggregate_devices"] == ["arm1"]
            for row in figures["rounds"]))
        figures["federation_ok"] = ok
    finally:
        out = Path(getattr(args, "out", workdir))
        out.mkdir(parents=True, exist_ok=True)
        if local and procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(procs[-1].pid, signal.SIGTERM)   # the job and the agent it started
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
        with contextlib.suppress(Exception):
            client.loop_stop()
        broker.close()
        server.close()
        for name, src in [("arm-console.log", console), ("arm-edge.log", workdir / "edge.log"),
                          ("arm-agent.log", serve / "up" / "agent.log"), ("arm-pip.log", serve / "up" / "pip.log"),
                          ("arm-freeze.txt", serve / "up" / "freeze.txt"), ("arm-du.txt", serve / "up" / "du.txt")]:
            if src.exists():
                shutil.copy(src, out / name)
        (workdir / "overlay.qcow2").unlink(missing_ok=True)
    print_table([{k: v for k, v in figures.items() if not isinstance(v, (dict, list))}])
    for row in figures.get("rounds", []):
        print_table([row])
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.bench.arm")
    parser.add_argument("command", choices=["build", "run"])
    parser.add_argument("--force", action="store_true", help="build: rebuild even when the cached image is current")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--smp", type=int, default=2, help="emulated cortex-a72 cores")
    parser.add_argument("--timeout", type=float, default=5400.0, help="seconds for boot, install, probe, rounds")
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    parser.add_argument("--local", action="store_true", help="run the guest's job on this machine (no VM)")
    args = parser.parse_args(argv)
    cache = cache_dir()
    if args.command == "build":
        if image_ready(cache) and not args.force:
            print(f"image ready in {cache}")
            return 0
        print(build_image(cache, sys.stdout))
        return 0
    import json

    figures = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "arm.json").write_text(json.dumps(figures, indent=2, default=float) + "\n")
    return 0 if figures.get("federation_ok") and figures.get("probe_ok") else 1


if __name__ == "__main__":
    raise SystemExit(main())
