"""A two-stage fake DAG for runner tests (imported by spec string, so it lives in its own module)."""

from core.context import StageResult

CALLS: list[str] = []


def run(ctx) -> StageResult:
    CALLS.append(ctx.stage)
    (ctx.workdir / "out.txt").write_text(ctx.stage + ":" + ",".join(sorted(ctx.inputs)))
    if ctx.stage == "second" and ctx.cfg.quant.iters == 13:
        raise RuntimeError("crash in second")
    return StageResult(metrics={"value": 1.0}, summary={"ok": True})
