"""HTML pages: the status page (rows by state, escaping of peer-supplied text), model and peer pages."""

from __future__ import annotations

import datetime as dt
import json
import math
import re
import time

import pytest
from django.urls import reverse

from monitor.snapshots import write_snapshot
from monitor.targets import ModelTarget
from swarm.data_structures import ServerState
from swarm.ping import PingResult
from tests.test_monitor_snapshots import MODEL, REACHABLE, UNREACHABLE, crawl_result, peer, span

pytestmark = pytest.mark.django_db

BIG = ModelTarget("bigscience/bloom-petals", 70, "bigscience/bloom", "https://huggingface.co/bigscience/bloom")


def _rows(html: str, dht_prefix: str) -> list[tuple[str, str]]:
    """(state, peer id) of each server row in the model's section."""
    section = html.split(f'data-dht-prefix="{dht_prefix}"', 1)[1].split("</section>", 1)[0]
    return re.findall(r'<tr class="server (\w+)" data-peer-id="([^"]+)"', section)


def test_status_page_before_the_first_crawl(client):
    response = client.get("/")
    assert response.status_code == 200
    assert b"No crawl has finished yet" in response.content


def test_status_page_shows_every_server_by_state(client):
    a, b, c, d, e, f = (peer(i) for i in "abcdef")
    write_snapshot(
        crawl_result(
            {
                MODEL: [
                    span(a, 0, 4),
                    span(b, 4, 8),
                    span(c, 0, 8),
                    span(d, 0, 8, ServerState.OFFLINE),
                    span(e, 2, 3, ServerState.JOINING),
                    span(f, 0, 8),  # not pinged (over the budget): unknown
                ],
                BIG: [span(peer("bloom"), 0, 35, public_name="half of bloom")],
            },
            {a: REACHABLE, b: REACHABLE, c: UNREACHABLE, peer("bloom"): REACHABLE},
            bootstrap={peer("boot"): REACHABLE},
        )
    )
    html = client.get("/").content.decode()

    assert sorted(_rows(html, MODEL.dht_prefix)) == sorted(
        [("online", a), ("online", b), ("unreachable", c), ("offline", d), ("joining", e), ("unknown", f)]
    )
    assert _rows(html, BIG.dht_prefix) == [("online", peer("bloom"))]
    demo = html.split(f'data-dht-prefix="{MODEL.dht_prefix}"', 1)[1].split("</section>", 1)[0]
    broken = html.split(f'data-dht-prefix="{BIG.dht_prefix}"', 1)[1].split("</section>", 1)[0]
    assert 'class="badge healthy"' in demo and 'class="badge broken"' in broken
    assert "No online server holds blocks 35:70." in broken and "No online server" not in demo
    # The span bar is drawn across the model's blocks.
    assert 'class="bar joining" style="left:25.000%;width:12.500%"' in demo
    for state in ("online", "joining", "unreachable", "offline"):
        assert f'<span class="swatch {state}"></span>' in html  # legend
    assert "routing: not found" in html  # reachability issues
    assert f'title="{peer("boot")}"' in html and "bootstrap online" in html
    assert reverse("monitor:model", args=[BIG.dht_prefix]) == "/models/bigscience/bloom-petals/"
    assert 'href="/models/bigscience/bloom-petals/"' in html


def test_status_page_escapes_peer_supplied_text(client):
    script = "<script>alert('pwned')</script>"
    x, y, z = peer("x"), peer("y"), peer("z")
    evil_model = ModelTarget("<b>evil</b>", 8, "<b>evil</b>", official=False)
    write_snapshot(
        crawl_result(
            {
                MODEL: [
                    span(x, 0, 8, public_name=script, version='"><img src=q onerror=alert(1)>'),
                    span(y, 0, 8, public_name="javascript:alert(1)"),
                    span(z, 0, 8, public_name="https://example.org/me"),
                ],
                evil_model: [],
            },
            {x: REACHABLE, y: REACHABLE, z: PingResult(True, 0.01)},
            bootstrap={peer("boot"): PingResult(False, error="<iframe src=//evil>")},
        )
    )
    html = client.get("/").content.decode()
    assert script not in html and "&lt;script&gt;alert(&#x27;pwned&#x27;)" in html
    assert "<img src=" not in html and "&quot;&gt;&lt;img src=" in html  # (shortened to 12 characters)
    assert "<b>evil</b>" not in html and "&lt;b&gt;evil&lt;/b&gt;" in html
    assert "<iframe" not in html
    assert 'href="javascript:' not in html  # a name that is not an http(s) address is text, not a link
    assert 'href="https://example.org/me" rel="nofollow noopener"' in html


def test_public_names_show_only_for_online_servers_holding_enough_blocks(client):
    big = ModelTarget("big-hf", 80, "Big")
    write_snapshot(
        crawl_result(
            {
                big: [
                    span(peer(1), 0, 10, public_name="long-span"),
                    span(peer(2), 10, 19, public_name="short-span"),
                    span(peer(3), 20, 40, public_name="unreachable-one"),
                ]
            },
            {peer(1): REACHABLE, peer(2): REACHABLE, peer(3): UNREACHABLE},
        )
    )
    html = client.get("/").content.decode()
    assert "long-span" in html
    assert "short-span" not in html and "unreachable-one" not in html
    assert "Top contributors" in html


def test_fragment_is_only_the_swappable_part(client):
    snapshot = write_snapshot(crawl_result({MODEL: [span(peer(1), 0, 8)]}, {peer(1): REACHABLE}))
    fragment = client.get("/?fragment=1").content.decode()
    assert "<html" not in fragment
    assert f'data-snapshot-id="{snapshot.pk}"' in fragment
    assert 'data-socket-path="/ws/monitor/"' in client.get("/").content.decode()


def test_model_page_embeds_chart_figures(client):
    now = time.time()
    for age, end in ((1800, 8), (600, 6)):
        write_snapshot(crawl_result({MODEL: [span(peer(1), 0, end)]}, {peer(1): REACHABLE}, started_at=now - age))
    response = client.get(reverse("monitor:model", args=[MODEL.dht_prefix]))
    assert response.status_code == 200
    html = response.content.decode()
    assert '<script src="/static/vendor/plotly.min.js">' in html
    data = json.loads(re.search(r'<script id="chart-data" type="application/json">(.*?)</script>', html, re.S)[1])
    assert set(data["figures"]) == {"coverage", "servers", "throughput", "availability", "peers"}
    heatmap = data["figures"]["coverage"]["data"][0]
    assert heatmap["type"] == "heatmap"
    # Blocks × crawls; the crawls are 20 minutes apart, so two blank columns mark the gap between them.
    assert heatmap["z"] == [[1, None, None, 1]] * 6 + [[1, None, None, 0]] * 2
    assert data["history_url"] == f"/api/v1/models/{MODEL.dht_prefix}/history"
    assert client.get("/models/never-seen/").status_code == 404


def test_model_pages_work_for_prefixes_with_slashes(client):
    write_snapshot(crawl_result({BIG: [span(peer(1), 0, 70)]}, {peer(1): REACHABLE}))
    assert client.get("/models/bigscience/bloom-petals/").status_code == 200


def test_peer_page_shows_its_history(client):
    a = peer("a")
    now = time.time()
    write_snapshot(crawl_result({MODEL: [span(a, 0, 4, version="2.2.0")]}, {a: REACHABLE}, started_at=now - 900))
    write_snapshot(crawl_result({MODEL: [span(a, 2, 8, version="2.3.0")]}, {a: UNREACHABLE}, started_at=now - 60))
    response = client.get(reverse("monitor:peer", args=[a]))
    assert response.status_code == 200
    html = response.content.decode()
    assert "<td>0:4</td>" in html and "<td>2:8</td>" in html
    assert "<td>2.2.0</td>" in html and "<td>2.3.0</td>" in html
    assert "routing: not found" in html  # failed pings
    data = json.loads(re.search(r'<script id="chart-data" type="application/json">(.*?)</script>', html, re.S)[1])
    assert set(data["figures"]) == {"states", "spans", "throughput", "pings"}
    # No crawl saw the peer for 14 minutes: its lines break there instead of bridging the gap.
    assert data["figures"]["throughput"]["data"][0]["y"] == [10.0, None, None, 10.0]
    assert "<td>2:8</td>" in html and re.search(r"<td>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC</td>", html)
    assert client.get(reverse("monitor:peer", args=[peer("nobody")])).status_code == 404
    assert client.get("/peers/not-a-peer-id/").status_code == 404


def test_each_servers_adapters_are_shown_escaped(client):
    a, b = peer("lora"), peer("plain")
    evil = "org/<img src=x onerror=alert(1)>"
    write_snapshot(
        crawl_result(
            {MODEL: [span(a, 0, 8, adapters=("org/lora-a", evil)), span(b, 0, 8)]}, {a: REACHABLE, b: REACHABLE}
        )
    )
    html = client.get("/").content.decode()
    row = html.split(f'data-peer-id="{a}"', 1)[1].split("</tr>", 1)[0]
    assert '<span title="org/lora-a">lora-a</span>' in row
    assert "<img" not in html and "&lt;img src=x onerror=alert(1)&gt;" in row
    plain = html.split(f'data-peer-id="{b}"', 1)[1].split("</tr>", 1)[0]
    assert '<td class="adapters" data-label="Adapters"></td>' in plain
    page = client.get(reverse("monitor:peer", args=[a])).content.decode()
    assert "adapters org/lora-a, org/&lt;img" in page and "<img" not in page


def test_favicon_is_served_and_linked_from_every_page(client):
    response = client.get("/favicon.ico", follow=True)
    assert response.status_code == 200
    assert response.redirect_chain and response.redirect_chain[-1][0].endswith("favicon.ico")
    icon = b"".join(response.streaming_content) if response.streaming else response.content
    assert icon.startswith(b"\x00\x00\x01\x00")  # an ICO file
    svg = client.get("/static/favicon.svg")
    assert svg.status_code == 200 and svg["Content-Type"].startswith("image/svg+xml")
    for url in ("/", "/chat/"):
        html = client.get(url).content.decode()
        assert '<link rel="icon" href="/static/favicon.svg" type="image/svg+xml">' in html, url
        assert '<link rel="icon" href="/static/favicon.ico"' in html, url


def _chart_data(html: str) -> dict:
    return json.loads(re.search(r'<script id="chart-data" type="application/json">(.*?)</script>', html, re.S)[1])


def test_charts_read_right_from_the_first_crawl(client):
    """One crawl of a new swarm: whole-server colour bar from 0, a visible dot per peer, minute ticks over
    the data's own time span (not the whole day before the swarm started)."""
    a, b = peer("a"), peer("b")
    write_snapshot(crawl_result({MODEL: [span(a, 0, 8), span(b, 0, 8)]}, {a: REACHABLE, b: REACHABLE}))
    figures = _chart_data(client.get(reverse("monitor:model", args=[MODEL.dht_prefix])).content.decode())["figures"]
    heatmap = figures["coverage"]["data"][0]
    assert heatmap["z"] == [[2]] * 8
    assert (heatmap["zmin"], heatmap["zmax"]) == (0, 2) and heatmap["colorbar"]["dtick"] == 1
    assert heatmap["colorbar"]["tickformat"] == "d"
    peers = figures["peers"]["data"]
    assert len(peers) == 2 and all(trace["mode"] == "lines+markers" and trace["y"] == [10.0] for trace in peers)
    availability = figures["availability"]
    (first, *_) = availability["data"][0]["x"]
    axis = availability["layout"]["xaxis"]
    assert axis["tickformat"] == "%H:%M" and axis["type"] == "date"
    start, end = (dt.datetime.fromisoformat(t) for t in axis["range"])
    assert dt.timedelta(minutes=9) < end - start <= dt.timedelta(minutes=11)  # around the data, not the whole day
    assert start < dt.datetime.fromisoformat(first).replace(tzinfo=None) < end
    assert availability["data"][0]["y"] == [100, 100]  # one crawl: a step over its period, not a lone dot
    assert "UTC" in availability["data"][0]["hovertemplate"]


def test_each_server_row_expands_to_its_details(client):
    a, b, c = peer("a"), peer("b"), peer("c")
    evil = "<img src=x onerror=alert(1)>"
    write_snapshot(
        crawl_result(
            {
                MODEL: [
                    span(
                        a, 0, 4, public_name="alice", version="2.3.0", cache_tokens_left=8000, quant_type="nf4",
                        adapters=("org/lora-a",), next_pings={b: 0.012, c: math.inf, evil: math.inf},
                        inference_rps=120.0,
                    ),
                    span(b, 4, 8),
                ]
            },
            {a: REACHABLE, b: REACHABLE},
        )
    )  # fmt: skip
    html = client.get("/").content.decode()
    row = html.split(f'data-peer-id="{a}"', 1)[1].split("</tr>", 2)
    server, detail = row[0], row[1]
    assert '<button type="button" class="expand" aria-expanded="false"' in server
    assert '<tr class="server-detail" hidden>' in detail
    for text in ("alice", "2.3.0", "8,000 tokens (1000 per block)", "nf4", "org/lora-a", "inference 120.0"):
        assert text in detail, text
    assert f'href="/peers/{b}/" title="{b}">…{b[-6:]}</a> 12 ms' in detail  # pings to next servers
    assert f"…{c[-6:]}</a> unreachable" in detail
    assert "onerror" not in html  # a key that is no peer id is not stored (monitor.snapshots._pings)


def test_reachability_issues_list_what_the_crawl_saw(client):
    a, b, c = peer("a"), peer("b"), peer("c")
    write_snapshot(
        crawl_result(
            {MODEL: [span(a, 0, 4, next_pings={b: math.inf}), span(b, 4, 8), span(c, 0, 8)]},
            {a: REACHABLE, b: REACHABLE, c: PingResult(False, error="<b>dial failed</b>")},
            bootstrap={peer("boot"): PingResult(False, error="timed out")},
        )
    )
    html = client.get("/").content.decode()
    section = html.split('id="reachability"', 1)[1].split("</section>", 1)[0]
    assert f'href="/peers/{c}/"' in section and "&lt;b&gt;dial failed&lt;/b&gt;" in section and "<b>" not in section
    assert f"{MODEL.dht_prefix} 0:8" in section
    assert "1 of 1 servers that ping it cannot reach it" in section  # b: the monitor reached it, a could not
    assert "bootstrap peer" in section and "timed out" in section
    state = client.get("/api/v1/state").json()
    assert {issue["peer_id"] for issue in state["reachability_issues"]} == {b, c, peer("boot")}


def test_contribute_call_shows_the_exact_command_for_this_swarm(client, settings):
    maddr = "/ip4/127.0.0.1/tcp/31337/p2p/" + peer("boot")
    settings.SWARM_INITIAL_PEERS = [maddr]
    demo = ModelTarget("demo_model-hf", 8, "Demo model")
    custom = ModelTarget("x<b>y</b>-hf", 8, "Custom", official=True)
    write_snapshot(crawl_result({demo: [span(peer(1), 0, 8)], BIG: [], custom: []}, {peer(1): REACHABLE}))
    html = client.get("/").content.decode()
    section = html.split('id="contribute"', 1)[1].split("</section>", 1)[0]
    commands = re.findall(r'<pre class="command"><code>(.*?)</code></pre>', section)
    assert f".venv/bin/python manage.py runblockserver bigscience/bloom --initial-peers {maddr}" in commands
    assert f".venv/bin/python manage.py runblockserver swarm/demo_model --initial-peers {maddr}" in commands
    # An unknown model: a placeholder and its prefix, shell-quoted and HTML-escaped.
    assert (
        ".venv/bin/python manage.py runblockserver MODEL --dht-prefix &#x27;x&lt;b&gt;y&lt;/b&gt;-hf&#x27; "
        f"--initial-peers {maddr}"
    ) in commands
    assert commands.index(commands[0]) == 0 and "bigscience/bloom" in commands[0]  # a broken model first
