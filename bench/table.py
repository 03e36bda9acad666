"""Turn the results into the printed report: the machine, one table per measurement, and a
closing table of targets. Pure: results in, text out."""

from __future__ import annotations

import math


def grid(headers: list[str], rows: list[list[str]], left: int = 1) -> str:
    """Columns aligned: the first `left` to the left, the rest (figures) to the right."""
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]

    def line(cells: list[str]) -> str:
        out = [
            str(c).ljust(w) if i < left else str(c).rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  " + "  ".join(out).rstrip()

    rule = "  " + "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])


def ms(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return (
        f"{value:.2f} ms" if value < 10 else f"{value:.1f} ms" if value < 100 else f"{value:.0f} ms"
    )


def met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def machine_section(info: dict[str, str]) -> str:
    width = max(len(k) for k in info)
    return "machine\n" + "\n".join(f"  {k.ljust(width)}  {v}" for k, v in info.items())


def startup_section(r: dict, scope: str) -> tuple[str, list[list[str]]]:
    hf = r["hyperfine_medians_ms"] or {}
    names = {
        "python -c pass": "python -c pass",
        "mpagent get (cached)": f"mpagent get {scope}   (cached, via the agent)",
        "mpagent get --no-agent": f"mpagent get {scope} --no-agent   (one-shot)",
        "cat env file": "cat tokens.env",
    }
    rows = [
        [label, str(r[key]["n"]), ms(r[key]["median_ms"]), ms(r[key]["p99_ms"]), ms(hf.get(key))]
        for key, label in names.items()
    ]
    text = (
        "1. whole-process time, paired runs (posix_spawn → exit; pairs alternate order)\n"
        + grid(["command", "runs", "median", "p99", "hyperfine median"], rows)
        + f"\n  mpagent get / python -c pass: {r['ratio_median_of_pairs']:.2f}x (median of per-pair"
        f" ratios; ratio of medians {r['ratio_of_medians']:.2f}x), +{r['extra_ms_median_of_pairs']:.1f} ms"
        f"\n  mpagent get --no-agent / python -c pass: {r['no_agent_ratio_median_of_pairs']:.0f}x"
    )
    ratio = r["ratio_median_of_pairs"]
    targets = [["1", "get (cached) ÷ python -c pass", f"{ratio:.2f}x", "≤ 1.3x", met(ratio <= 1.3)]]
    return text, targets


LOAD_HEADERS = ["p50", "p99", "max", "errors", "agent CPU (1 core)", "agent CPU/get"]
LOAD_HEADERS += ["machine busy"]


def _load_cells(r: dict) -> list[str]:
    """One load level's figures after its rate: latencies, errors, CPU (measurements 2, 7)."""
    return [
        ms(r["p50_ms"]),
        ms(r["p99_ms"]),
        ms(r["max_ms"]),
        str(r["errors"]),
        f"{r['agent_cpu_pct']:.0f} %",
        f"{1e4 * r['agent_cpu_pct'] * r['seconds'] / max(1, r['requests']):.0f} µs",
        f"{r['machine_busy_pct']:.0f} %",
    ]


def throughput_section(levels: list[dict], seconds: float) -> tuple[str, list[list[str]]]:
    rows = [[str(r["clients"]), f"{r['per_second']:,.0f}", *_load_cells(r)] for r in levels]
    text = (
        f"2. agent throughput, cached get, new connection per request ({seconds:g} s per level)\n"
        + grid(["clients", "get/s", *LOAD_HEADERS], rows)
    )
    targets = []
    for r in levels:
        if r["clients"] == 16:
            ok = r["per_second"] >= 3000 and r["p99_ms"] <= 20 and r["errors"] == 0
            targets.append(
                [
                    "2",
                    "16 clients: get/s, p99",
                    f"{r['per_second']:,.0f}/s, {ms(r['p99_ms'])}",
                    "≥ 3,000/s, ≤ 20 ms",
                    met(ok),
                ]
            )
    return text, targets


def http_section(r: dict, seconds: float) -> tuple[str, list[list[str]]]:
    """Measurement 7: the texas-compatible endpoint beside the Unix socket, one agent."""
    unix, http = r["unix"], r["http"]
    rows = [
        ["Unix socket: mpagent/1 get", f"{unix['per_second']:,.0f}", *_load_cells(unix)],
        ["HTTP: POST /api/v1/token", f"{http['per_second']:,.0f}", *_load_cells(http)],
    ]
    ratio = http["per_second"] / max(unix["per_second"], 1e-9)
    text = (
        f"7. texas-compatible HTTP endpoint beside the Unix socket ({http['clients']} clients, "
        f"cached token, new connection per request, keep-alive off; {seconds:g} s each)\n"
        + grid(["transport", "req/s", *LOAD_HEADERS[:5], "agent CPU/req", LOAD_HEADERS[6]], rows)
        + f"\n  HTTP ÷ Unix socket: {ratio:.2f}x the throughput, p99 "
        f"{http['p99_ms'] / max(unix['p99_ms'], 1e-9):.1f}x"
    )
    target = [
        "7",
        f"{http['clients']} clients: HTTP req/s, p99",
        f"{http['per_second']:,.0f}/s, {ms(http['p99_ms'])} (socket {unix['per_second']:,.0f}/s,"
        f" {ms(unix['p99_ms'])})",
        "(no target)",
        "-" if http["errors"] == 0 else f"{http['errors']} errors",
    ]
    return text, [target]


def refresh_section(r: dict) -> tuple[str, list[list[str]]]:
    rows = [
        [
            k["scope"],
            str(k["issuer_requests"]),
            str(k["refreshes"]),
            str(k["issued_by_emulator"]),
            f"{k['policy_min']}-{k['policy_max']}",
            str(k["lifetime_minimum"]),
        ]
        for k in r["keys"]
    ]
    rows.append(
        [
            "total",
            str(r["issuer_requests"]),
            str(r["refreshes"]),
            str(r["emulator_token_requests"]),
            f"{r['policy_min']}-{r['policy_max']}",
            str(r["lifetime_minimum"]),
        ]
    )
    text = (
        f"3. issuer requests per token key ({r['run_seconds']:.0f} s run, {r['lifetime']} s tokens,"
        f" {len(r['keys'])} scopes, ~50 get/s alongside)\n"
        + grid(
            [
                "token key",
                "issuer_requests",
                "refreshes",
                "emulator",
                "policy (50-60 %)",
                "⌈run/lifetime⌉",
            ],
            rows,
        )
        + f"\n  interval between a key's issues: {r['interval_fraction_min']:.3f}-"
        f"{r['interval_fraction_max']:.3f} of the lifetime (policy 0.5-0.6; ± request time)"
        f"\n  gets served alongside: {r['gets_served']:,}, failed: {r['gets_failed']};"
        f" agent CPU over the run (refreshes and gets): {r['agent_cpu_seconds']:.2f} s"
    )
    keys_ok = all(
        k["issuer_requests"] == k["refreshes"] == k["issued_by_emulator"]
        and k["policy_min"] <= k["refreshes"] <= k["policy_max"]
        for k in r["keys"]
    )
    ok = keys_ok and r["issuer_requests"] == r["emulator_token_requests"] and r["gets_failed"] == 0
    targets = [
        [
            "3",
            "issuer requests vs refreshes required",
            f"{r['emulator_token_requests']} requests = {r['refreshes']} refreshes"
            f" (policy {r['policy_min']}-{r['policy_max']})",
            "= required, + nothing",
            met(ok),
        ]
    ]
    return text, targets


def idle_section(levels: list[dict]) -> tuple[str, list[list[str]]]:
    rows = [
        [
            f"{r['keys']:,}",
            f"{r['cpu_pct']:.2f} %",
            f"{r['oncpu_pct']:.3f} %",
            str(r["refreshes_in_window"]),
            f"{r['rss_mb']:.1f} MB",
            f"{r['hwm_mb']:.1f} MB",
            str(r["threads"]),
            f"{r['startup_fetch_s']:.1f} s",
            f"{r['env_file_kb']:.0f} KB",
        ]
        for r in levels
    ]
    window = levels[0]["window_s"] if levels else 0
    text = (
        f"4. idle agent by token keys ({window:.0f} s window, 120 s tokens; CPU as % of one core)\n"
        + grid(
            [
                "keys",
                "CPU (utime+stime)",
                "CPU (schedstat)",
                "refreshes in window",
                "RSS",
                "peak RSS",
                "threads",
                "first fetch of all",
                "env file",
            ],
            rows,
        )
    )
    targets = []
    for r in levels:
        if r["keys"] == 20:
            ok = r["cpu_pct"] < 1 and r["rss_mb"] < 80
            targets.append(
                [
                    "4",
                    "20 keys idle: CPU, RSS",
                    f"{r['cpu_pct']:.2f} %, {r['rss_mb']:.0f} MB",
                    "< 1 %, < 80 MB",
                    met(ok),
                ]
            )
    return text, targets


def envfile_section(r: dict) -> tuple[str, list[list[str]]]:
    a, b = r["issue_to_file_ms"], r["log_to_file_ms"]
    rows = [
        ["emulator issued the token → file shows it", str(a["n"]), ms(a["median"]), ms(a["max"])],
        ["agent logged 'refreshed' → file shows it", str(b["n"]), ms(b["median"]), ms(b["max"])],
    ]
    text = (
        "5. refresh → env file (polled every 1 ms by another process; log stamps are whole ms)\n"
        + grid(["from", "refreshes", "median", "max"], rows)
    )
    targets = [
        [
            "5",
            "refresh → env file",
            f"median {ms(a['median'])}, max {ms(a['max'])}",
            "(no target)",
            "-",
        ]
    ]
    return text, targets


def installers_section(rows: list[dict]) -> tuple[str, list[list[str]]]:
    """Measurement 6: per installer, cached get and env against python -c pass on the
    interpreter (and flags) of that installer's command."""
    limits = {"get": 1.2, "env": 1.3}
    table_rows, targets = [], []
    for r in rows:
        get, env = r["get"], r["env"]
        table_rows.append(
            [
                r["installer"],
                r["version"],
                r["launcher"],
                "yes" if r["imports re"] else "no",
                ms(get.get("python_ms", env.get("python_ms"))),
                ms(get.get("command_ms")),
                f"{get['ratio']:.2f}x" if "ratio" in get else "failed",
                ms(env.get("command_ms")),
                f"{env['ratio']:.2f}x" if "ratio" in env else "failed",
            ]
        )
        for verb, m in (("get", get), ("env", env)):
            ratio = m.get("ratio")
            targets.append(
                [
                    "6",
                    f"{verb} ÷ python -c pass: {r['installer']}",
                    "failed" if ratio is None else f"{ratio:.2f}x",
                    f"≤ {limits[verb]}x",
                    met(ratio is not None and ratio <= limits[verb]),
                ]
            )
    runs = max((m.get("n", 0) for r in rows for m in (r["get"], r["env"])), default=0)
    failures = [f"{r['installer']} {v}: {r[v]['error']}" for r in rows for v in ("get", "env")
                if "error" in r[v]]  # fmt: skip
    headers = ["installer", "version", "launcher", "imports re", "python -c pass", "get",
               "get ÷ python", "env", "env ÷ python"]  # fmt: skip
    text = (
        f"6. cached get and env per installer ({runs} paired runs per verb; medians; ÷ is the"
        " median of per-pair ratios; python -c pass on each command's interpreter and flags)\n"
        + grid(headers, table_rows)
        + "".join(f"\n  {line}" for line in failures)
    )
    return text, targets


def targets_section(rows: list[list[str]]) -> str:
    return "targets\n" + grid(["#", "figure", "measured", "target", "verdict"], rows, left=5)
