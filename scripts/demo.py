"""`make demo`: barge's main job end to end on local defaults.

Builds a small real disk image (an ext4 filesystem holding real system files), starts two
throwaway docker-registry instances on free loopback ports, runs every barge command on it,
and stops the registries by PID. Everything lives under .demo/ (recreated on each run).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from registries import RunningRegistry, start_registry  # noqa: E402

DEMO = ROOT / ".demo"
BARGE = str(ROOT / ".venv" / "bin" / "barge")


def step(title: str) -> None:
    print(f"\n\033[1m== {title}\033[0m", flush=True)


def run(*args: str, env: dict[str, str], ok: tuple[int, ...] = (0,)) -> str:
    print(f"$ barge {' '.join(shlex.quote(a) for a in args)}", flush=True)
    t0 = time.monotonic()
    proc = subprocess.run([BARGE, *args], env=env, capture_output=True, text=True, check=False)
    out = proc.stdout + proc.stderr
    print(out.rstrip())
    print(f"  (exit {proc.returncode}, {time.monotonic() - t0:.2f} s)", flush=True)
    if proc.returncode not in ok:
        raise SystemExit(f"demo failed: barge {' '.join(args)} exited {proc.returncode}")
    return proc.stdout


def tiny_guest() -> Path:
    """The tiny test guest, built once from Debian packages and cached (scripts/build-guest.py)."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "build-guest.py"), "tiny"],
        check=True,
        stdout=subprocess.PIPE,
        text=True,
    ).stdout
    return Path(out.strip().splitlines()[-1])


def main() -> None:
    if DEMO.exists():
        shutil.rmtree(DEMO)
    DEMO.mkdir()
    env = dict(os.environ, BARGE_HOME=str(DEMO / "home"), DOCKER_CONFIG=str(DEMO / "docker"))
    for var in ("BARGE_REGISTRY_USERNAME", "BARGE_REGISTRY_PASSWORD"):
        env.pop(var, None)

    step("build a small real disk image (ext4 with real system files, sparse)")
    disk = DEMO / "disk.raw"
    subprocess.run(
        [
            "bash",
            str(ROOT / "scripts" / "make-image.sh"),
            str(disk),
            "1G",
            "/usr/lib/python3",
            "/usr/share/zoneinfo",
            "/usr/share/doc",
        ],
        check=True,
    )
    st = disk.stat()
    print(f"{disk}: {st.st_size >> 20} MiB, {st.st_blocks * 512 >> 20} MiB allocated")

    regs: list[RunningRegistry] = []
    running: list[str] = []
    try:
        step("start two throwaway registries on loopback")
        a = start_registry(DEMO / "registry-a")
        regs.append(a)
        b = start_registry(DEMO / "registry-b")
        regs.append(b)
        print(f"registry A: {a.host} (pid {a.pid})\nregistry B: {b.host} (pid {b.pid})")

        step("local VMs: create, list, get, set, clone, rename")
        run("create", "demo", "--from-disk", str(disk), "--cpus", "2", "--memory", "1G", env=env)
        run("list", env=env)
        run("get", "demo", env=env)
        run("set", "demo", "--cpus", "4", "--disk-size", "2G", env=env)
        run("clone", "demo", "demo-clone", env=env)
        run("rename", "demo-clone", "scratch", env=env)
        run("set", "scratch", "--disk-size", "1G", env=env, ok=(2,))  # disks only grow
        run("get", "no-such-vm", env=env, ok=(3,))

        ref = f"{a.host}/demo/vm"
        step("push: one upload, several tags; the chunk size is chosen before uploading")
        run("push", "demo", f"{ref}:v1", f"{ref}:latest", f"{a.host}/other/vm:v1", env=env)
        step("push again to a new tag: nothing is compressed or uploaded")
        run("push", "demo", f"{ref}:v2", "--format", "json", env=env)
        step("a registry with a small layer cap: barge raises the chunk size up front")
        run("push", "demo", f"{ref}:capped", "--max-layers", "4", "--chunk-size", "64M", env=env)
        run("push", "demo", f"{ref}:nope", "--max-layers", "2", env=env, ok=(10,))

        step("inspect and tags")
        run("inspect", f"{ref}:v1", env=env)
        run("tags", ref, env=env)

        step("pull into the cache (verified, sparse), clone from the registry")
        run("delete", "scratch", env=env)
        run("pull", f"{ref}:v1", env=env)
        run("pull", f"{ref}:v1", env=env)  # up to date
        run("clone", f"{ref}:v1", "from-registry", env=env)
        run("list", env=env)

        step("copy to another registry (same digest), tag remotely, verify deeply")
        mirror = f"{b.host}/mirror/vm"
        run("copy", f"{ref}:v1", f"{mirror}:v1", env=env)
        run("copy", f"{ref}:v1", f"{mirror}:v1", env=env)  # resumable: nothing left to send
        run("tag", f"{ref}:v1", "stable", "prod", env=env)
        run("verify", f"{mirror}:v1", "--deep", env=env)
        run("verify", f"{ref}:v1", env=env)  # the cached entry, frame by frame
        run("verify", "demo", env=env)

        step("a multi-platform index: one entry per VM's platform")
        run("create", "arm", "--disk-size", "64M", "--arch", "aarch64", env=env)
        run("push", "demo", "arm", "--index", f"{ref}:multi", env=env)
        run("inspect", f"{ref}:multi", env=env)
        run("pull", f"{ref}:multi", "--platform", "linux/arm64", env=env)

        step("Tart's format: push, pull back, re-push without uploading")
        # no Tart-made nvram.bin here: a placeholder (Tart refuses a zero one until replaced)
        run(
            "push",
            "demo",
            f"{a.host}/tart/vm:v1",
            "--format",
            "tart",
            "--placeholder-nvram",
            env=env,
        )
        run("clone", f"{a.host}/tart/vm:v1", "from-tart", env=env)
        run("push", "from-tart", f"{a.host}/tart/vm:v2", "--format", "tart", env=env)

        step("export to an OCI layout archive and import it back")
        archive = DEMO / "demo.tar"
        run("export", "demo", str(archive), env=env)
        run("import", str(archive), "imported", env=env)
        run("list", env=env)

        step("a real guest: push it, pull it back, run it, exec in it, stop it")
        guest = tiny_guest()
        kernel = guest / ("vmlinux" if (guest / "vmlinux").exists() else "vmlinuz")
        print(f"the tiny test guest (Debian's kernel + busybox/dropbear, docs/guests.md): {guest}")
        run(
            "create",
            "guest",
            "--kernel",
            str(kernel),
            "--initramfs",
            str(guest / "initramfs.img"),
            "--cmdline",
            (guest / "cmdline").read_text().strip(),
            "--disk-size",
            "64M",
            "--cpus",
            "1",
            "--memory",
            "256M",
            env=env,
        )
        gref = f"{a.host}/demo/guest:v1"
        run("push", "guest", gref, env=env)
        run("delete", "guest", env=env)
        run("pull", gref, env=env)
        run("clone", gref, "guest", env=env)
        running.append("guest")
        run("run", "guest", "--detach", env=env)
        run("exec", "--wait", "150", "guest", "uname", "-sr", env=env)
        run("exec", "guest", "sh", "-c", "hostname; ls /dev/vd*; exit 3", env=env, ok=(3,))
        run("ip", "guest", env=env)
        run("stop", "guest", env=env)
        running.remove("guest")
        run("list", env=env)

        step("clean up: delete cached image, prune")
        run("delete", f"{ref}:v1", "from-registry", "from-tart", "imported", env=env)
        run("prune", env=env)
        run("list", env=env)
    finally:
        for name in running:  # a VM the demo started and did not get to stop
            subprocess.run([BARGE, "stop", name, "--timeout", "10"], env=env, check=False)
        pids = [str(r.pid) for r in regs]
        for r in regs:
            r.stop()
        print(f"\nstopped registries (pids {', '.join(pids)})")
    print("\ndemo finished: every step above ran against real registries on loopback")


if __name__ == "__main__":
    main()
