"""The dashboard's HTML pages: inline CSS, a few lines of vanilla JS, nothing from the network.

The overview refreshes its figures from `/api/status` every second; the camera page refreshes
its latest frame and charts. Review buttons POST to the JSON API.
"""

from __future__ import annotations

from html import escape
from typing import Any

from .api import describe
from .feed import CameraFeed, FrameRecord

STYLE = """
body{font-family:system-ui,sans-serif;margin:0;background:#f4f5f7;color:#222}
header{background:#1f2d3d;color:#fff;padding:10px 18px}header a{color:#fff;margin-right:18px}
main{padding:14px 18px}h2{margin:18px 0 8px}
table{border-collapse:collapse;background:#fff}
td,th{border:1px solid #ddd;padding:4px 8px;text-align:left}
.ok{color:#2a7d48}.ng{color:#c03030}.muted{color:#777}
.grid{display:flex;flex-wrap:wrap;gap:12px}
.card{background:#fff;border:1px solid #ddd;padding:8px;width:330px}
.wide{width:auto}.card img{width:100%}.wide img{width:auto}
.card input{width:95%}.card button{margin:4px 4px 0 0}
img.latest{width:480px;border:1px solid #ccc}.grid{align-items:flex-start}
"""

# Fills the elements with a data-field from /api/status, every second; reloads the images
# with a data-refresh every `period` ms.
REFRESH_SCRIPT = """
function show(v){
  if(v===null||v===undefined)return '\u2013';
  if(typeof v==='boolean')return v?'yes':'no';
  return String(v);
}
async function refresh(){
  try{
    const status=await (await fetch('/api/status')).json();
    for(const [name,c] of Object.entries(status.cameras)){
      for(const el of document.querySelectorAll(`[data-camera="${name}"][data-field]`)){
        let v=c;
        for(const p of el.dataset.field.split('.'))v=v==null?null:v[p];
        el.textContent=show(v);
      }
    }
  }catch(e){}
}
function reload(){
  for(const i of document.querySelectorAll('img[data-refresh]'))i.src=i.dataset.refresh+'?t='+Date.now();
}
setInterval(refresh,1000);
setInterval(reload,period);
"""

REVIEW_SCRIPT = """
async function review(button,label){
  const item=button.closest('[data-event]');
  const body=JSON.stringify({label:label,note:item.querySelector('input').value});
  const reply=await fetch(`/api/events/${item.dataset.event}/review`,
    {method:'POST',headers:{'Content-Type':'application/json'},body:body});
  const result=item.querySelector('.result');
  if(reply.ok){
    result.textContent='labelled '+label;
    for(const b of item.querySelectorAll('button'))b.disabled=true;
  }else{
    result.textContent='failed: '+((await reply.json()).error||reply.status);
  }
}
"""


def _refresh(period_ms: int) -> str:
    return f"const period={period_ms};{REFRESH_SCRIPT}"


CAMERA_FIELDS = (
    ("connected", "connected"),
    ("fps", "fps"),
    ("latency_ms_mean", "latency ms (mean)"),
    ("latency_ms_p95", "latency ms (p95)"),
    ("frames", "frames"),
    ("inferences", "inferences"),
    ("anomalies", "anomalies"),
    ("errors", "errors"),
    ("reconnects", "reconnects"),
    ("last_error", "last error"),
    ("model_status", "model state"),
    ("last_hour.ok", "OK, last hour"),
    ("last_hour.ng", "NG, last hour"),
    ("last_hour.yield", "yield, last hour"),
    ("last_day.ok", "OK, last day"),
    ("last_day.ng", "NG, last day"),
    ("last_day.yield", "yield, last day"),
    ("review_pending", "to review"),
)


def _page(title: str, body: str, script: str = "") -> str:
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{escape(title)}</title>"
        f"<style>{STYLE}</style></head><body><header><b>lookout-edge camera</b> &nbsp; "
        f"<a href='/'>overview</a><a href='/review'>review</a><a href='/metrics'>metrics</a></header>"
        f"<main><h1>{escape(title)}</h1>{body}</main><script>{script}</script></body></html>"
    )


def _value(counts: dict[str, Any], field: str) -> str:
    value: Any = counts
    for part in field.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return escape(str(value))


def _camera_table(name: str, counts: dict[str, Any]) -> str:
    rows = "".join(
        f"<tr><th>{label}</th><td data-camera='{escape(name)}' data-field='{field}'>"
        f"{_value(counts, field)}</td></tr>"
        for field, label in CAMERA_FIELDS
    )
    return f"<table><tr><th>model</th><td>{escape(counts['model'])}</td></tr>{rows}</table>"


def overview(status: dict[str, Any]) -> str:
    parts = []
    for name, counts in status["cameras"].items():
        link = escape(f"/cameras/{name}")
        chart = escape(f"/charts/{name}/yield.svg")
        parts.append(
            f"<div class='card wide'><h2><a href='{link}'>{escape(name)}</a></h2><div class='grid'>"
            f"{_camera_table(name, counts)}<img data-refresh='{chart}' src='{chart}' alt='OK/NG chart'>"
            "</div></div>"
        )
    sink_rows = "".join(
        f"<tr><td>{escape(name)}</td>"
        + "".join(
            f"<td>{_value(counts, key)}</td>"
            for key in (
                "delivered",
                "pending",
                "dropped",
                "quarantined",
                "failures",
                "connected",
                "last_error",
            )
        )
        + "</tr>"
        for name, counts in status["sinks"].items()
    )
    sinks = (
        "<h2>Sinks and spools</h2><table><tr><th>sink</th><th>delivered</th><th>pending</th>"
        "<th>dropped</th><th>quarantined</th><th>failures</th><th>connected</th><th>last error</th></tr>"
        f"{sink_rows}</table>"
    )
    review = status["review"]
    reviewed = (
        f"<h2>Reviewed</h2><p>{review['normal']} normal, {review['anomaly']} anomaly in "
        f"<code>{escape(review['manifest'])}</code></p>"
    )
    body = f"<div class='grid'>{''.join(parts)}</div>{sinks}{reviewed}"
    return _page("Overview", body, _refresh(3000))


def _verdict(event: dict[str, Any]) -> str:
    return "<b class='ng'>anomaly</b>" if event["is_anomalous"] else "<b class='ok'>normal</b>"


def _facts(event: dict[str, Any]) -> str:
    return (
        f"{_verdict(event)} · score {event['anomaly_score']:g} · threshold {event['threshold']:g} · "
        f"confidence {event['confidence']:g}<br><span class='muted'>{escape(event['time'])}</span>"
    )


def _anomalous_card(record: FrameRecord) -> str:
    item = describe(record)
    names = ", ".join(a["name"] for a in item["anomalies"] if a["name"].lower() != "background")
    return (
        f"<div class='card'><img src='{item['overlay_url']}' alt='frame with mask'>"
        f"<p>{_facts(item)}{'<br>' + escape(names) if names else ''}</p></div>"
    )


def review_card(record: FrameRecord) -> str:
    item = describe(record)
    return (
        f"<div class='card' data-event='{item['event_id']}'><img src='{item['frame_url']}' alt='frame'>"
        f"<p><b>{escape(item['camera'])}</b> · {_facts(item)}</p>"
        "<input placeholder='note' maxlength='1000'><br>"
        "<button class='normal' onclick=\"review(this,'normal')\">Normal</button>"
        "<button class='anomaly' onclick=\"review(this,'anomaly')\">Anomaly</button>"
        " <span class='result'></span></div>"
    )


def _queue(records: list[FrameRecord]) -> str:
    if not records:
        return "<p class='muted'>Nothing to review.</p>"
    return f"<div class='grid'>{''.join(review_card(r) for r in records)}</div>"


def camera(feed: CameraFeed, counts: dict[str, Any]) -> str:
    name = feed.name
    latest = escape(f"/cameras/{name}/latest.jpg")
    scores = escape(f"/charts/{name}/scores.svg")
    anomalous = "".join(_anomalous_card(r) for r in feed.anomalous()) or "<p class='muted'>None yet.</p>"
    body = (
        f"<div class='grid'><div><img class='latest' data-refresh='{latest}' src='{latest}' "
        f"alt='latest frame'></div><div>{_camera_table(name, counts)}</div>"
        f"<div><img data-refresh='{scores}' src='{scores}' alt='score histogram'></div></div>"
        f"<h2>Recent anomalous frames</h2><div class='grid'>{anomalous}</div>"
        f"<h2>Review queue</h2>{_queue(feed.review_queue())}"
    )
    return _page(f"Camera {name}", body, _refresh(2000) + REVIEW_SCRIPT)


def review(feeds: list[CameraFeed]) -> str:
    records = [record for feed in feeds for record in feed.review_queue()]
    body = (
        "<p>Anomalous frames, frames near the threshold and a random sample. A label writes the frame "
        "and a Ground Truth line to the review dataset.</p>" + _queue(records)
    )
    return _page("Review queue", body, REVIEW_SCRIPT)
