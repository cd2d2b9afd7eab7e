"""The diagnostics as fixed-width text: what ``normlab diagnose`` prints."""

import math

from normlab.diagnostics.rules import Report, stability_line
from normlab.diagnostics.snapshot import SecondOrderStats


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def format_table(rep: Report) -> str:
    """Fixed-width tables of layers, parameters and BatchNorms, then the verdicts."""
    snap = rep.snapshot
    lines = [f"diagnostics at step {snap.step:,}"]
    if snap.loss is not None:
        line = f"loss {snap.loss:.4f}"
        if snap.eval_loss is not None:
            line += f" (train mode), {snap.eval_loss:.4f} (eval mode, same batch)"
        if rep.num_classes:
            line += f"; ln({rep.num_classes}) = {math.log(rep.num_classes):.4f}"
        lines.append(line)
    lines += [
        "",
        f"{'layer':<22}{'kind':<10}{'mean':>9}{'std':>9}{'p5':>9}{'p95':>9}"
        f"{'sat %':>7}{'dead %':>7}{'grad std':>10}",
    ]
    for layer in snap.layers:
        lines.append(
            f"{layer.name[:21]:<22}{layer.kind:<10}{layer.mean:>9.3f}{layer.std:>9.3f}"
            f"{layer.percentiles['p5']:>9.3f}{layer.percentiles['p95']:>9.3f}"
            f"{_fmt(layer.saturated and layer.saturated * 100, '.1f'):>7}"
            f"{_fmt(layer.dead and layer.dead * 100, '.1f'):>7}{_fmt(layer.grad_std, '.2e'):>10}"
        )
    lines += [
        "",
        f"{'parameter':<26}{'shape':<14}{'data std':>10}{'grad std':>10}"
        f"{'grad:data':>11}{'log10 upd:data':>15}",
    ]
    for p in snap.params:
        log_update = math.log10(p.update_to_data) if p.update_to_data else None
        lines.append(
            f"{p.name[:25]:<26}{'x'.join(map(str, p.shape)):<14}{p.data_std:>10.3f}"
            f"{_fmt(p.grad_std, '.2e'):>10}{_fmt(p.grad_to_data, '.2e'):>11}"
            f"{_fmt(log_update, '.2f'):>15}"
        )
    if snap.batchnorms:
        lines += ["", f"{'batchnorm':<26}{'mean drift':>12}{'var ratio':>11}{'time consts':>13}"]
        for bn in snap.batchnorms:
            lines.append(
                f"{bn.name[:25]:<26}{bn.mean_drift:>12.3f}{bn.var_ratio:>11.3f}{bn.time_constants:>13.1f}"
            )
    lines.append("")
    if snap.second_order is not None:
        lines += [*_second_order_lines(snap.second_order), ""]
    if rep.unrecorded:
        lines += [f"not recorded (no known kind): {', '.join(rep.unrecorded)}", ""]
    if rep.verdicts:
        lines.append(f"verdicts ({len(rep.verdicts)}):")
        for v in rep.verdicts:
            lines.append(f"  {v.kind:<18} {v.layer}: {v.message}")
    else:
        lines.append("verdicts: none (healthy by every check)")
    return "\n".join(lines)


def _second_order_lines(so: SecondOrderStats) -> list[str]:
    """The curvature and the gradient noise, with the lines they are judged against."""
    lines = [f"second order (batch {so.batch_size}, lr {_fmt(so.lr, '.3g')}):"]
    lines.append(f"  sharpness λmax(H)          {_fmt(so.sharpness, '.4g')}")
    if so.preconditioned_sharpness is not None:
        lines.append(f"  Adam's λmax(P⁻¹H)          {so.preconditioned_sharpness:.4g}")
    found = stability_line(so)
    if found is not None:
        lines.append(f"  stability line             {found[1]:.4g} ({found[2]})")
    lines.append(f"  Hessian trace              {_fmt(so.hessian_trace, '.4g')}")
    lines.append(f"  noise scale B_simple       {_fmt(so.noise_scale, '.4g')}")
    if so.note:
        lines.append(f"  note: {so.note}")
    return lines
