"""The bench's outputs: the table, the targets with their ratios, and the latency chart."""

from __future__ import annotations

from pathlib import Path

from bench.stats import Figure, Target, ratio


def _median(figures: list[Figure], name: str) -> float:
    for figure in figures:
        if figure.name == name:
            return figure.median
    return float("nan")


def targets(figures: list[Figure], memory_backlogs: tuple[int, int]) -> list[Target]:
    found: list[Target] = []

    def check(name: str, measured: float, goal: str, met: bool) -> None:
        if measured == measured:  # skip figures this run did not measure (NaN)
            found.append(Target(name, round(measured, 3), goal, met))

    for clients in (1, 16, 64):
        outbox, plain, naive = (_median(figures, f"{v} c={clients} rps") for v in ("outbox", "plain", "naive"))
        check(f"API c={clients}: outbox / no side effect, req/s", r := ratio(outbox, plain), ">= 0.85", r >= 0.85)
        check(f"API c={clients}: outbox / naive .delay(), req/s", r := ratio(outbox, naive), ">= 3", r >= 3)
        minimal = _median(figures, f"minimal c={clients} rps")
        check(
            f"API c={clients}: endpoint / minimal app, same SQL, req/s", r := ratio(outbox, minimal), ">= 0.9", r >= 0.9
        )
        p99 = ratio(_median(figures, f"outbox c={clients} p99_ms"), _median(figures, f"plain c={clients} p99_ms"))
        check(f"API c={clients}: outbox p99 / no side effect p99", p99, "<= 1.5", p99 <= 1.5)
        unobserved = _median(figures, f"unobserved c={clients} rps")
        check(
            f"API c={clients}: with / without metrics and tracing, req/s",
            r := ratio(outbox, unobserved),
            ">= 0.95",
            r >= 0.95,
        )
        noauth = _median(figures, f"noauth c={clients} rps")
        check(
            f"API c={clients}: authenticated / unauthenticated, req/s", r := ratio(outbox, noauth), ">= 0.9", r >= 0.9
        )
    one = _median(figures, "relay x1 events/s")
    check(
        "relay x1 / send_task loop, events/s",
        r := ratio(one, _median(figures, "send_task loop events/s")),
        ">= 10",
        r >= 10,
    )
    check(
        "relay x2 / relay x1, events/s",
        r := ratio(_median(figures, "relay x2 events/s"), one),
        ">= 1.5 (CPU allowing)",
        r >= 1.5,
    )
    p50 = _median(figures, "relay 200/s commit->broker p50")
    p99 = _median(figures, "relay 200/s commit->broker p99")
    check("commit->broker p50 at 200/s, ms", p50, "<= 5", p50 <= 5)
    check("commit->broker p99 at 200/s, ms", p99, "<= 50", p99 <= 50)
    check(
        "1s poller p50 / relay p50 at 200/s",
        r := ratio(_median(figures, "1s poller 200/s commit->broker p50"), p50),
        ">= 50",
        r >= 50,
    )
    cost = ratio(
        _median(figures, "the two tasks, zero delays, CPU per task"),
        _median(figures, "no-op task, same Celery config, CPU per task"),
    )
    check("worker CPU per task: the two tasks / no-op", cost, "<= 1.3", cost <= 1.3)
    for figure in figures:
        if figure.name.startswith("relay CPU, broker down"):
            rows = figure.name.split(", ")[2]
            check(f"relay CPU, broker down, {rows}, % of one core", figure.median, "< 5", figure.median < 5)
    small, large = memory_backlogs
    memory = ratio(_median(figures, f"peak RSS, {large:,} backlog"), _median(figures, f"peak RSS, {small:,} backlog"))
    check(f"relay peak RSS {large:,} / {small:,} backlog", memory, "<= 1.2", memory <= 1.2)
    return found


def print_table(figures: list[Figure], checks: list[Target]) -> None:
    print(f"\n{'scenario':<18} {'figure':<46} {'median':>12} {'min':>12} {'max':>12}  unit")
    for figure in figures:
        low, high = min(figure.values, default=float("nan")), max(figure.values, default=float("nan"))
        print(
            f"{figure.scenario:<18} {figure.name:<46} {figure.median:>12.1f} {low:>12.1f} {high:>12.1f}  {figure.unit}"
        )
    print(f"\n{'target':<52} {'measured':>10}  {'goal':<22} met")
    for target in checks:
        print(f"{target.name:<52} {target.measured:>10.3f}  {target.goal:<22} {'yes' if target.met else 'NO'}")


def chart(samples: dict[str, list[float]], path: Path) -> None:
    """Cumulative distributions of commit->broker latency, relay against the 1 s poller."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(9, 5))
    for label, values in sorted(samples.items()):
        ordered = sorted(v for v in values if v > 0)
        if ordered:
            axis.plot(ordered, [(i + 1) / len(ordered) for i in range(len(ordered))], label=label)
    axis.set_xscale("log")
    axis.set_xlabel("commit -> broker latency (ms, log scale)")
    axis.set_ylabel("fraction of messages")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
