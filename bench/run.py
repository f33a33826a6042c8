"""barge end-to-end benchmark: push, re-push, pull, incremental pull and copy against skopeo,
next to the machine's own limits, all measured in one run (``make bench``).

    .venv/bin/python bench/run.py [--small] [--skip-limits] [--only push,pull,copy]

Prints a table (metric, barge, baseline, ratio, target, pass/fail) and writes the figures to
``bench/out/bench-<time>.json`` and ``bench/out/latest.json``. See docs/bench.md.

Every registry is a fresh ``docker-registry`` on 127.0.0.1, stopped by PID when its stage
ends. The machine is small and shared: compare figures within one run (the ratios).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fleet  # noqa: E402
import limits  # noqa: E402
import refdisk  # noqa: E402
from common import (  # noqa: E402
    BARGE,
    OUT,
    MiB,
    Registry,
    Timed,
    barge_commands,
    barge_env,
    fmt_bytes,
    fresh_dir,
    manifest,
    rate,
    registry,
    run_timed,
    skopeo,
)

CHUNK_MEDIA_PREFIX = "application/vnd.barge.disk.chunk.v1"
OFFSET_ANNOTATION = "dev.barge.disk.offset"


@dataclass
class Row:
    metric: str
    barge: str
    baseline: str
    ratio: float | None
    target: str
    ok: bool | None  # None: no target / not measured


class Bench:
    def __init__(self, spec: refdisk.Spec, stages: set[str]) -> None:
        self.spec = spec
        self.stages = stages
        self.rows: list[Row] = []
        self.res: dict[str, Any] = {
            "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "machine": {
                "cpus": os.cpu_count(),
                "affinity": len(os.sched_getaffinity(0)),
                "kernel": platform.release(),
                "python": platform.python_version(),
                "loadavg_start": os.getloadavg(),
            },
            "spec": spec.name,
            "errors": {},
        }
        self.work = fresh_dir(OUT / "work")
        self.cmds = barge_commands()
        self.res["barge_commands"] = sorted(self.cmds)

    # -- reporting ---------------------------------------------------------------------------
    def row(
        self,
        metric: str,
        barge: str,
        baseline: str = "",
        ratio: float | None = None,
        target: str = "",
        ok: bool | None = None,
    ) -> None:
        self.rows.append(Row(metric, barge, baseline, ratio, target, ok))
        r = f"  ratio {ratio:.2f}" if ratio is not None else ""
        verdict = "" if ok is None else ("  PASS" if ok else "  FAIL")
        print(f"  {metric}: {barge}  |  {baseline}{r}  {target}{verdict}", flush=True)

    def stage(self, name: str, fn: Callable[[], None]) -> None:
        print(f"== {name}", flush=True)
        t0 = time.perf_counter()
        try:
            fn()
        except Exception as e:  # a stage failing must not lose the others' figures
            traceback.print_exc()
            self.res["errors"][name] = f"{type(e).__name__}: {e}"
            self.row(f"{name}: ERROR", str(e).splitlines()[0][:60] if str(e) else type(e).__name__)
        self.res.setdefault("stage_seconds", {})[name] = round(time.perf_counter() - t0, 1)

    @staticmethod
    def t(x: Timed) -> dict[str, Any]:
        return {
            "seconds": round(x.seconds, 3),
            "max_rss_mib": round(x.max_rss_kib / 1024, 1),
            "cpu_seconds": round(x.cpu_seconds, 2),
            "loadavg_1m_after": round(os.getloadavg()[0], 2),
        }

    # -- stages ------------------------------------------------------------------------------
    def refdisk(self) -> None:
        t0 = time.perf_counter()
        self.disk = refdisk.build(self.spec)
        self.disk_v2 = refdisk.build_v2(self.spec)
        info = refdisk.info(self.spec)
        self.res["refdisk"] = {
            "path": str(self.disk),
            "size": self.spec.disk_size,
            "data_bytes": info["data_bytes"],
            "random_bytes": self.spec.random_bytes,
            "v2": refdisk.v2_info(self.spec),
            "ready_seconds": round(time.perf_counter() - t0, 1),
        }
        print(
            f"  {self.disk.name}: {fmt_bytes(self.spec.disk_size)} sparse, "
            f"{fmt_bytes(int(info['data_bytes']))} data "  # type: ignore[call-overload]
            f"({fmt_bytes(self.spec.random_bytes)} random)"
        )

    def limits(self) -> None:
        intake = 256 * MiB if self.spec is refdisk.SMALL else 1 << 30
        lim = limits.measure(self.spec, intake_size=intake)
        self.res["limits"] = lim
        self.row(
            "disk read cold/warm MB/s", f"{lim['read_cold_MBps']:.0f} / {lim['read_warm_MBps']:.0f}"
        )
        self.row("sha256 MB/s (1 core)", f"{lim['sha256_MBps']:.0f}")
        for c in ("zstd-3", "zstd-1", "lz4"):
            self.row(
                f"{c} MB/s (1 core), ratio",
                f"{lim[c + '_MBps']:.0f}, x{lim[c + '_ratio']:.2f} (fs x{lim[c + '_ratio_fs']:.2f})",
            )
        self.row("registry intake MB/s (2 curl)", f"{lim['intake_MBps']:.0f}")

    def push(self, reg: Registry) -> None:
        home = self.home_push = fresh_dir(self.work / "home-push")
        env = barge_env(home)
        cr = run_timed([BARGE, "create", "ref", "--from-disk", self.disk], env=env).check()
        out: dict[str, Any] = {"create": self.t(cr)}
        self.ref_v1 = f"{reg.host}/bench/ref:v1"
        p = run_timed([BARGE, "push", "ref", self.ref_v1, "--quiet", "--format", "json"], env=env)
        p.check()
        pj = p.json()
        out["push"] = {**self.t(p), **pj}
        man = manifest(reg, "bench/ref", "v1")
        layer_bytes = sum(int(x["size"]) for x in man["layers"])
        out["image_bytes"] = layer_bytes
        self.image_bytes = layer_bytes
        uploaded = int(pj.get("uploadedBytes", layer_bytes))
        wire = rate(uploaded, p.seconds)
        out["wire_MBps"] = round(wire, 1)

        # re-push, unchanged, to a new tag
        rp = run_timed(
            [BARGE, "push", "ref", f"{reg.host}/bench/ref:v1-again", "--quiet", "--format", "json"],
            env=env,
        ).check()
        out["repush"] = {**self.t(rp), **rp.json()}

        # baseline: the same image as an OCI layout (barge writes it), then skopeo to a registry
        layout = self.work / "layout-v1"
        shutil.rmtree(layout, ignore_errors=True)
        lp = run_timed(
            [BARGE, "push", "ref", f"oci:{layout}:v1", "--quiet", "--format", "json"], env=env
        ).check()
        out["push_to_layout"] = self.t(lp)
        with registry("skopeo-push") as reg_b:
            sk = run_timed(
                skopeo("copy", "--dest-tls-verify=false", f"oci:{layout}:v1",
                       f"docker://{reg_b.host}/bench/skopeo:v1"),
            ).check()  # fmt: skip
        shutil.rmtree(layout, ignore_errors=True)
        out["skopeo"] = self.t(sk)
        out["skopeo_wire_MBps"] = round(rate(layer_bytes, sk.seconds), 1)
        self.res["push"] = out

        intake = self.res.get("limits", {}).get("intake_MBps")
        ratio = p.seconds / sk.seconds
        self.row(
            "push time s (vs skopeo of pre-compressed OCI)",
            f"{p.seconds:.1f}",
            f"{sk.seconds:.1f}",
            ratio,
            "<= 0.75",
            ratio <= 0.75,
        )
        self.row(
            "push peak RSS MiB",
            f"{p.max_rss_kib / 1024:.0f}",
            f"{sk.max_rss_kib / 1024:.0f}",
            p.max_rss_kib / max(1, sk.max_rss_kib),
        )
        self.row(
            "push CPU s (user+sys)",
            f"{p.cpu_seconds:.1f}",
            f"{sk.cpu_seconds:.1f}",
            p.cpu_seconds / max(0.01, sk.cpu_seconds),
        )
        if intake:
            self.row(
                "push wire MB/s vs registry intake",
                f"{wire:.0f} ({fmt_bytes(uploaded)})",
                f"{intake:.0f}",
                wire / intake,
                ">= 0.90",
                wire / intake >= 0.90,
            )
            self.row(
                "skopeo wire MB/s vs registry intake",
                f"{rate(layer_bytes, sk.seconds):.0f}",
                f"{intake:.0f}",
                rate(layer_bytes, sk.seconds) / intake,
            )
        rj = out["repush"]
        self.row(
            "re-push unchanged, new tag: s (uploaded)",
            f"{rp.seconds:.2f} ({fmt_bytes(int(rj.get('uploadedBytes', -1)))})",
            "",
            None,
            "<= 1 s",
            rp.seconds <= 1.0,
        )
        self.row("push to oci: layout s (compress only)", f"{lp.seconds:.1f}")
        lim = self.res.get("limits", {})
        if lim.get("sha256_MBps") and lim.get("zstd-1_MBps"):
            # the least CPU a push needs: zstd-1 (barge's default) and one sha256 over the
            # data, one sha256 over the layers, spread over every core (the registry's own
            # work not counted)
            data = int(self.res["refdisk"]["data_bytes"])
            cpu = data / (lim["zstd-1_MBps"] * 1e6) + (data + layer_bytes) / (
                lim["sha256_MBps"] * 1e6
            )
            floor = cpu / max(1, self.res["machine"]["affinity"])
            out["cpu_floor_seconds"] = round(floor, 2)
            self.row(
                "push vs its CPU floor s (zstd-1 + sha256, all cores)",
                f"{p.seconds:.1f}",
                f"{floor:.1f}",
                p.seconds / floor,
            )

    def pull(self, reg: Registry) -> None:
        if "pull" not in self.cmds:
            self.row("pull", "not available (barge pull missing)")
            return
        home = fresh_dir(self.work / "home-pull")
        env = barge_env(home)
        before = reg.log_size()
        p = run_timed([BARGE, "pull", self.ref_v1, "--quiet", "--format", "json"], env=env)
        p.check()
        pj = _maybe_json(p)
        got, nreq = reg.blob_get_bytes(before)
        out: dict[str, Any] = {"pull": {**self.t(p), **pj, "registry_blob_bytes": got}}
        dest = self.work / "skopeo-pull"
        shutil.rmtree(dest, ignore_errors=True)
        sk = run_timed(
            skopeo("copy", "--src-tls-verify=false", f"docker://{self.ref_v1}", f"oci:{dest}:v1")
        ).check()
        shutil.rmtree(dest, ignore_errors=True)
        out["skopeo"] = self.t(sk)
        ratio = p.seconds / sk.seconds
        self.row("pull time s, empty cache (vs skopeo)", f"{p.seconds:.1f}", f"{sk.seconds:.1f}",
                 ratio, "<= 0.9", ratio <= 0.9)  # fmt: skip
        rss = p.max_rss_kib / 1024
        self.row("pull peak RSS MiB", f"{rss:.0f}", f"{sk.max_rss_kib / 1024:.0f}",
                 rss / max(1, sk.max_rss_kib / 1024), "<= 300 MiB", rss <= 300)  # fmt: skip
        self.row("pull wire MB/s", f"{rate(got, p.seconds):.0f} ({fmt_bytes(got)}, {nreq} GETs)",
                 f"{rate(self.image_bytes, sk.seconds):.0f}")  # fmt: skip

        # incremental: push v2, pull it onto the cache holding v1
        env_push = barge_env(self.home_push)
        run_timed([BARGE, "create", "ref2", "--from-disk", self.disk_v2], env=env_push).check()
        ref_v2 = f"{reg.host}/bench/ref:v2"
        p2 = run_timed(
            [BARGE, "push", "ref2", ref_v2, "--quiet", "--format", "json"], env=env_push
        ).check()
        out["push_v2"] = {**self.t(p2), **p2.json()}
        before = reg.log_size()
        ip = run_timed([BARGE, "pull", ref_v2, "--quiet", "--format", "json"], env=env).check()
        ipj = _maybe_json(ip)
        got2, nreq2 = reg.blob_get_bytes(before)
        out["pull_v2"] = {**self.t(ip), **ipj, "registry_blob_bytes": got2, "gets": nreq2}
        v2 = refdisk.v2_info(self.spec)
        changed = int(v2["changed_bytes_4k"])  # type: ignore[call-overload]
        # Tart-like: every 512 MiB region holding a changed 4 KiB block is a whole new layer
        man2 = manifest(reg, "bench/ref", "v2")
        layer_by_region: dict[int, int] = {}
        for layer in man2["layers"]:
            if not str(layer.get("mediaType", "")).startswith(CHUNK_MEDIA_PREFIX):
                continue
            ann = layer.get("annotations") or {}
            off = int(ann.get(OFFSET_ANNOTATION, -1))
            if off >= 0:
                layer_by_region[off // (512 * MiB)] = int(layer["size"])
        regions = list(v2["changed_regions_512m"])  # type: ignore[call-overload]
        tart = sum(layer_by_region.get(r, 0) for r in regions)
        fetched = int(ipj.get("fetchedBytes", got2))
        out["incremental"] = {
            "changed_bytes_4k": changed,
            "fetched_bytes": fetched,
            "reused_bytes": ipj.get("reusedBytes"),
            "registry_blob_bytes": got2,
            "regions_512m": regions,
            "tart_like_bytes": tart,
        }
        self.res["pull"] = out
        self.row("incremental push v2: s (uploaded)",
                 f"{p2.seconds:.1f} ({fmt_bytes(int(out['push_v2'].get('uploadedBytes', 0)))})")  # fmt: skip
        self.row(
            "incremental pull v2 onto v1: fetched / changed(4K)",
            f"{fmt_bytes(fetched)} / {fmt_bytes(changed)}",
            f"tart-like {fmt_bytes(tart)} / {fmt_bytes(changed)}",
            fetched / max(1, tart),
            "barge/tart-like",
        )
        self.row("  fetched/changed", f"{fetched / max(1, changed):.2f}",
                 f"{tart / max(1, changed):.2f}")  # fmt: skip
        self.row("  4 MiB frames / 512 MiB regions touched",
                 f"{v2.get('changed_frames_4m')} frames", f"{len(regions)} regions")  # fmt: skip
        self.row("incremental pull v2: s, peak RSS MiB",
                 f"{ip.seconds:.1f}, {ip.max_rss_kib / 1024:.0f}")  # fmt: skip

    def copy(self, reg: Registry) -> None:
        if "copy" not in self.cmds:
            self.row("copy", "not available (barge copy missing)")
            return
        home = fresh_dir(self.work / "home-copy")
        env = barge_env(home)
        out: dict[str, Any] = {}
        with registry("copy-barge") as rc, registry("copy-skopeo") as rd:
            c = run_timed(
                [BARGE, "copy", self.ref_v1, f"{rc.host}/bench/ref:v1", "--quiet"], env=env
            ).check()
            sk = run_timed(
                skopeo("copy", "--src-tls-verify=false", "--dest-tls-verify=false",
                       f"docker://{self.ref_v1}", f"docker://{rd.host}/bench/ref:v1"),
            ).check()  # fmt: skip
        out["copy"] = self.t(c)
        out["skopeo"] = self.t(sk)
        ratio = c.seconds / sk.seconds
        self.row("copy registry->registry s (vs skopeo)", f"{c.seconds:.1f}", f"{sk.seconds:.1f}",
                 ratio, "<= 0.8", ratio <= 0.8)  # fmt: skip
        self.row("copy peak RSS MiB", f"{c.max_rss_kib / 1024:.0f}",
                 f"{sk.max_rss_kib / 1024:.0f}")  # fmt: skip
        s = run_timed(
            [BARGE, "copy", self.ref_v1, f"{reg.host}/bench/other:v1", "--quiet"], env=env
        ).check()
        out["same_registry"] = self.t(s)
        ss = run_timed(
            skopeo("copy", "--src-tls-verify=false", "--dest-tls-verify=false",
                   f"docker://{self.ref_v1}", f"docker://{reg.host}/bench/other-skopeo:v1"),
        ).check()  # fmt: skip
        out["same_registry_skopeo"] = self.t(ss)
        self.row("copy same registry, other repo s", f"{s.seconds:.2f}", f"{ss.seconds:.2f}",
                 s.seconds / ss.seconds, "< 1 s", s.seconds < 1.0)  # fmt: skip
        self.res["copy"] = out

    def fleet(self, reg: Registry) -> None:
        """N hosts pulling at once through one pull-through mirror, and without it."""
        out = fleet.measure(self.ref_v1, reg, self.work)
        self.res["fleet"] = out
        n, img = out["hosts"], self.image_bytes
        for name in ("mirror", "warmed", "direct"):
            if out[name]["failures"]:
                raise RuntimeError(f"fleet {name}: {out[name]['failures'][0]}")
        direct = out["direct"]
        direct_x = direct["upstream_bytes"] / img
        for name, what in (("mirror", "all at once"), ("warmed", "one first, then the rest")):
            run = out[name]
            served = run["upstream_bytes"] / img
            self.row(
                f"fleet {n} hosts via mirror ({what}): upstream bytes / image",
                f"{served:.2f}x ({fmt_bytes(run['upstream_bytes'])})",
                f"{direct_x:.2f}x without mirror",
                round(served / max(direct_x, 1e-9), 3),
                "<= 1.05x",
                served <= 1.05,
            )
            self.row(
                f"fleet {n} hosts via mirror ({what}): wall time s",
                f"{run['seconds']:.1f} ({fmt_bytes(run['mirror_bytes'])} from the mirror)",
                f"{direct['seconds']:.1f} direct",
                round(run["seconds"] / max(direct["seconds"], 1e-9), 2),
            )

    # -- driver --------------------------------------------------------------------------
    def run(self) -> int:
        load = os.getloadavg()[0]
        if load > (os.cpu_count() or 1) / 2:
            print(f"note: load average {load:.1f} at start: the machine is busy, expect noise")
        self.stage("reference disk", self.refdisk)
        if "limits" in self.stages:
            self.stage("machine limits", self.limits)
        with ExitStack() as stack:
            reg = stack.enter_context(registry("main"))
            self.stage("push", lambda: self.push(reg))
            if "push" in self.res:
                if "pull" in self.stages:
                    self.stage("pull", lambda: self.pull(reg))
                if "copy" in self.stages:
                    self.stage("copy", lambda: self.copy(reg))
                if "fleet" in self.stages:
                    self.stage("fleet", lambda: self.fleet(reg))
        self.res["machine"]["loadavg_end"] = os.getloadavg()
        self.res["rows"] = [r.__dict__ for r in self.rows]
        self.print_table()
        self.write()
        shutil.rmtree(self.work, ignore_errors=True)
        return 1 if self.res["errors"] else 0

    def print_table(self) -> None:
        head = ("metric", "barge", "baseline", "ratio", "target", "result")
        body = [
            (
                r.metric,
                r.barge,
                r.baseline,
                "" if r.ratio is None else f"{r.ratio:.2f}",
                r.target,
                "" if r.ok is None else ("PASS" if r.ok else "FAIL"),
            )
            for r in self.rows
        ]
        widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
        m = self.res["machine"]
        print()
        print(
            f"barge bench {self.res['date']}  {self.spec.name}  {m['cpus']} CPUs  "
            f"load {m['loadavg_start'][0]:.2f} -> {m['loadavg_end'][0]:.2f}"
        )
        line = "  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))
        print(line)
        print("-" * len(line))
        for b in body:
            print("  ".join(c.ljust(w) for c, w in zip(b, widths, strict=True)))

    def write(self) -> None:
        OUT.mkdir(parents=True, exist_ok=True)
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        data = json.dumps(self.res, indent=2, default=str)
        path = OUT / f"bench-{stamp}.json"
        path.write_text(data)
        (OUT / "latest.json").write_text(data)
        print(f"\nwrote {path}")


def _maybe_json(t: Timed) -> dict[str, Any]:
    try:
        v = t.json()
    except ValueError:
        return {}
    return v if isinstance(v, dict) else {}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true", help="1 GiB disk / ~256 MiB data (quick)")
    ap.add_argument("--skip-limits", action="store_true", help="skip the machine limits")
    ap.add_argument("--only", default="push,pull,copy,fleet", help="stages after push (comma list)")
    args = ap.parse_args()
    stages = set(args.only.split(","))
    if not args.skip_limits:
        stages.add("limits")
    for tool in (
        "/usr/bin/docker-registry",
        "/usr/bin/time",
        shutil.which("skopeo"),
        shutil.which("curl"),
    ):
        if not tool or not Path(tool).exists():
            print(f"missing tool: {tool} (make setup installs docker-registry and skopeo)")
            return 2
    subprocess.run(["true"], check=True)
    return Bench(refdisk.spec_for(args.small), stages).run()


if __name__ == "__main__":
    sys.exit(main())
