"""SVG charts drawn on the server: nothing to load in the browser, no script."""

from __future__ import annotations

from html import escape

WIDTH, HEIGHT = 480, 150
TOP, BOTTOM, LEFT = 22, 18, 8
OK_COLOR, NG_COLOR, THRESHOLD_COLOR = "#3a9d5d", "#d64545", "#1f4e9c"


def _svg(body: list[str], height: int = HEIGHT) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
        f'viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="11">' + "".join(body) + "</svg>"
    )


def _yield_text(ok: int, ng: int) -> str:
    if not ok + ng:
        return "no inferences"
    return f"yield {ok / (ok + ng):.1%} ({ok} OK, {ng} NG)"


def _bars(counts: list[tuple[int, int]], top: int, height: int, title: str) -> list[str]:
    """Stacked OK (green) / NG (red) bars, one per period, oldest on the left."""
    ok_total, ng_total = sum(c[0] for c in counts), sum(c[1] for c in counts)
    body = [f'<text x="{LEFT}" y="{top - 6}">{escape(title)}: {_yield_text(ok_total, ng_total)}</text>']
    peak = max((ok + ng for ok, ng in counts), default=0) or 1
    step = (WIDTH - 2 * LEFT) / max(len(counts), 1)
    for index, (ok, ng) in enumerate(counts):
        x = LEFT + index * step
        ok_h, ng_h = height * ok / peak, height * ng / peak
        base = top + height
        if ok:
            body.append(
                f'<rect x="{x:.1f}" y="{base - ok_h:.1f}" width="{max(step - 1, 1):.1f}" '
                f'height="{ok_h:.1f}" fill="{OK_COLOR}"/>'
            )
        if ng:
            body.append(
                f'<rect x="{x:.1f}" y="{base - ok_h - ng_h:.1f}" width="{max(step - 1, 1):.1f}" '
                f'height="{ng_h:.1f}" fill="{NG_COLOR}"/>'
            )
    body.append(
        f'<line x1="{LEFT}" y1="{top + height}" x2="{WIDTH - LEFT}" y2="{top + height}" stroke="#999"/>'
    )
    return body


def yield_chart(minutes: list[tuple[int, int]]) -> str:
    """The last hour per minute and the last day per hour, from per-minute counts (oldest first)."""
    hours = [
        (sum(ok for ok, _ in minutes[i : i + 60]), sum(ng for _, ng in minutes[i : i + 60]))
        for i in range(0, len(minutes), 60)
    ]
    band = (HEIGHT - TOP - BOTTOM) // 2
    body = _bars(minutes[-60:], TOP, band - 10, "last hour, per minute")
    body += _bars(hours, TOP + band + 12, band - 10, "last day, per hour")
    return _svg(body, HEIGHT + 14)


def score_histogram(scores: list[float], threshold: float | None, bins: int = 30) -> str:
    """The distribution of recent scores, the threshold as a vertical line."""
    body = [f'<text x="{LEFT}" y="14">anomaly score, last {len(scores)} inferences</text>']
    if not scores:
        return _svg(body)
    marks = [*scores, *([threshold] if threshold is not None else [])]
    low, high = min(0.0, *marks), max(marks) * 1.1 or 1.0
    width = (high - low) / bins
    counts = [0] * bins
    for score in scores:
        counts[min(int((score - low) / width), bins - 1)] += 1
    peak = max(counts)
    plot = HEIGHT - TOP - BOTTOM
    step = (WIDTH - 2 * LEFT) / bins
    for index, count in enumerate(counts):
        if count:
            h = plot * count / peak
            color = NG_COLOR if threshold is not None and low + index * width >= threshold else OK_COLOR
            body.append(
                f'<rect x="{LEFT + index * step:.1f}" y="{TOP + plot - h:.1f}" width="{step - 1:.1f}" '
                f'height="{h:.1f}" fill="{color}"><title>{count}</title></rect>'
            )
    body.append(f'<line x1="{LEFT}" y1="{TOP + plot}" x2="{WIDTH - LEFT}" y2="{TOP + plot}" stroke="#999"/>')
    body.append(f'<text x="{LEFT}" y="{HEIGHT - 4}">{low:g}</text>')
    body.append(f'<text x="{WIDTH - LEFT}" y="{HEIGHT - 4}" text-anchor="end">{high:.3g}</text>')
    if threshold is not None:
        x = LEFT + (threshold - low) / (high - low) * (WIDTH - 2 * LEFT)
        body.append(
            f'<line x1="{x:.1f}" y1="{TOP - 4}" x2="{x:.1f}" y2="{TOP + plot}" stroke="{THRESHOLD_COLOR}" '
            'stroke-width="2" stroke-dasharray="4 3"/>'
            f'<text x="{x + 4:.1f}" y="{TOP + 8}" fill="{THRESHOLD_COLOR}">threshold {threshold:g}</text>'
        )
    return _svg(body)
