from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

from raftlb.config.load import check_main, load_config, parse_config
from raftlb.config.model import Config, H2Config
from raftlb.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[2] / "configs"

GOOD = """\
listeners:
  - address: 127.0.0.1:8080
clusters:
  - name: demo
    nodes:
      - id: n1
        url: http://127.0.0.1:7001
      - id: n2
        url: http://127.0.0.1:7002
      - id: n3
        url: http://127.0.0.1:7003
"""


def parse(text: str, **env: str) -> Config:
    return parse_config(textwrap.dedent(text), source="test.yaml", environ=env)


def error(text: str, **env: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse(text, **env)
    return info.value


def test_minimal_config_gets_defaults() -> None:
    cfg = parse(GOOD)
    assert cfg.source == "test.yaml"
    (listener,) = cfg.listeners
    assert (listener.name, listener.host, listener.port, listener.cluster) == (
        "listener0",
        "127.0.0.1",
        8080,
        "demo",
    )
    cluster = cfg.cluster("demo")
    assert cluster.kind == "native" and cluster.routes == () and cluster.liveness_timeout == 1.0
    assert [n.id for n in cluster.nodes] == ["n1", "n2", "n3"]
    assert cluster.nodes[2].announce_url == cluster.nodes[2].url == "http://127.0.0.1:7003"
    assert (cfg.admin.host, cfg.admin.port, cfg.drain_timeout) == ("127.0.0.1", 9090, 10.0)


def test_admin_allowed_hosts_and_max_connections() -> None:
    cfg = parse(GOOD + "admin: {allowed_hosts: [raftlb, Raftlb.Default.SVC., .svc.cluster.local, '*'], "
                       "max_connections: 50}\n")
    assert cfg.admin.allowed_hosts == ("raftlb", "raftlb.default.svc", ".svc.cluster.local", "*")
    assert cfg.admin.max_connections == 50
    assert (parse(GOOD).admin.allowed_hosts, parse(GOOD).admin.max_connections) == ((), 10000)


def test_http2_settings() -> None:
    assert parse(GOOD).http2 == H2Config()
    cfg = parse(GOOD + "http2: {enabled: false, max_concurrent_streams: 8, initial_window_size: 1MiB, "
                       "max_resets_per_second: 5, max_control_frames_per_second: 50}\n")
    assert cfg.http2 == H2Config(enabled=False, max_concurrent_streams=8, initial_window_size=1 << 20,
                                 max_resets_per_second=5, max_control_frames_per_second=50)


def test_full_cluster_settings_are_converted() -> None:
    cfg = parse(
        """\
        listeners: [{address: "[::1]:0", cluster: b}, {name: other, address: "0.0.0.0:8081", cluster: a}]
        admin: {enabled: false}
        limits: {max_header_bytes: 8KiB, max_body_bytes: 1MB, header_timeout: 1.5s, write_buffer_high: 4096}
        logging: {level: DEBUG, format: json, access_log: true}
        drain_timeout: 0
        clusters:
          - name: a
            kind: etcd
            liveness_timeout: 250ms
            reconnect: {min: 10ms, max: 1m}
            retry_after: 1.2s
            hold: {timeout: 0, max_requests: 5, max_bytes: 1GiB}
            pool: {max_idle_per_node: 0, idle_timeout: 2h}
            nodes: [{id: "010", url: "https://Node.example", announce_url: "http://10.0.0.1:2379/"}]
            routes:
              - {methods: [get, head], path: "^/v3/kv/range$", kind: read, policy: any}
              - {path: "^/v3/kv/put", idempotent: true}
          - name: b
            nodes: [{id: x, url: "http://[::1]:7001"}]
        """
    )
    a = cfg.cluster("a")
    assert [(lst.name, lst.host, lst.port, lst.cluster) for lst in cfg.listeners] == [
        ("listener0", "::1", 0, "b"),
        ("other", "0.0.0.0", 8081, "a"),
    ]
    assert not cfg.admin.enabled and cfg.drain_timeout == 0
    assert (cfg.limits.max_header_bytes, cfg.limits.max_body_bytes) == (8192, 1_000_000)
    assert (cfg.limits.header_timeout, cfg.limits.write_buffer_high) == (1.5, 4096)
    assert (cfg.logging.level, cfg.logging.format, cfg.logging.access_log) == ("debug", "json", True)
    assert (a.kind, a.liveness_timeout, a.reconnect_min, a.reconnect_max, a.retry_after) == (
        "etcd",
        0.25,
        0.01,
        60,
        2,
    )
    assert (a.hold.timeout, a.hold.max_requests, a.hold.max_bytes) == (0, 5, 2**30)
    assert (a.pool.max_idle_per_node, a.pool.idle_timeout) == (0, 7200)
    node = a.nodes[0]
    assert (node.id, node.url, node.host, node.port) == (
        "010",
        "https://node.example:443",
        "node.example",
        443,
    )
    assert node.announce_url == "http://10.0.0.1:2379"
    read, write = a.routes
    assert read.methods == frozenset({"GET", "HEAD"}) and read.kind == "read" and read.policy == "any"
    assert read.path is not None and read.path.search("/v3/kv/range")
    assert write.methods is None and write.kind == "write" and write.policy == "leader" and write.idempotent
    assert cfg.cluster("b").nodes[0].url == "http://[::1]:7001"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("5s", 5.0),
        ("250ms", 0.25),
        ("600ms", 0.6),
        ("1.5s", 1.5),
        ("1m", 60.0),
        ("2h", 7200.0),
        ("3", 3.0),
        ("0.5", 0.5),
        ('"7"', 7.0),
    ],
)
def test_durations(text: str, expected: float) -> None:
    assert parse(GOOD + f"    liveness_timeout: {text}\n").clusters[0].liveness_timeout == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("64KiB", 65536),
        ("16MiB", 16 * 2**20),
        ("1GiB", 2**30),
        ("10KB", 10_000),
        ("1MB", 10**6),
        ("123", 123),
        ("0", 0),
        ("1.5KiB", 1536),
        ("2 kib", 2048),
        ("7B", 7),
    ],
)
def test_sizes(text: str, expected: int) -> None:
    assert parse(GOOD + f"    resend_body_limit: {text}\n").clusters[0].resend_body_limit == expected


def test_env_expansion_with_and_without_default() -> None:
    text = GOOD.replace("127.0.0.1:8080", "${HOST}:${PORT:-8080}") + "    liveness_timeout: ${LIVE:-2s}\n"
    cfg = parse(text, HOST="10.1.2.3")
    assert (cfg.listeners[0].host, cfg.listeners[0].port) == ("10.1.2.3", 8080)
    assert cfg.clusters[0].liveness_timeout == 2.0
    cfg = parse(text, HOST="10.1.2.3", PORT="9000", LIVE="")  # empty takes the default, as in the shell
    assert cfg.listeners[0].port == 9000 and cfg.clusters[0].liveness_timeout == 2.0


def test_env_expansion_reads_os_environ_and_skips_comment_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAFTLB_TEST_PORT", "8181")
    monkeypatch.delenv("RAFTLB_UNSET", raising=False)
    text = "# ${RAFTLB_UNSET} in a comment is left alone\n" + GOOD.replace("8080", "${RAFTLB_TEST_PORT}")
    cfg = parse_config(text)
    assert cfg.listeners[0].port == 8181 and cfg.source is None
    escaped = GOOD + '    routes: [{path: "$${literal}"}]\n'
    route = parse(escaped).clusters[0].routes[0]
    assert route.path is not None and route.path.pattern == "${literal}"


BAD = [
    pytest.param(
        GOOD.replace("http://127.0.0.1:7003", "htp//x"),
        "test.yaml:11: clusters[0].nodes[2].url: "
        "must be an http:// or https:// URL with host and port, got 'htp//x'",
        id="bad-url-third-node",
    ),
    pytest.param(
        GOOD + "    livenes_timeout: 1s\n",
        "test.yaml:12: clusters[0].livenes_timeout: unknown key (did you mean liveness_timeout?)",
        id="unknown-key-suggestion",
    ),
    pytest.param(
        GOOD + "bogus: 1\n", "test.yaml:12: bogus: unknown key (expected one of: listeners,", id="unknown-top"
    ),
    pytest.param(
        GOOD + "    poll_interval: soon\n",
        "test.yaml:12: clusters[0].poll_interval: "
        "must be a duration like 250ms, 5s, 1m or a number of seconds, got 'soon'",
        id="bad-duration",
    ),
    pytest.param(GOOD + "    poll_interval: 5d\n", "unknown duration unit 'd'", id="duration-unit"),
    pytest.param(GOOD + "    poll_interval: .inf\n", "must be a duration like", id="duration-infinite"),
    pytest.param(
        GOOD + "drain_timeout: -1\n", "drain_timeout: must be zero or more, got -1", id="drain-negative"
    ),
    pytest.param(
        GOOD + "    hold: {timeot: 1s}\n",
        "test.yaml:12: clusters[0].hold.timeot: unknown key (did you mean timeout?)",
        id="nested-unknown-key",
    ),
    pytest.param(
        GOOD + "limits: {max_headers: 0}\n", "limits.max_headers: must be at least 1, got 0", id="min"
    ),
    pytest.param(
        GOOD + "http2: {max_concurrent_streams: 0}\n",
        "http2.max_concurrent_streams: must be at least 1, got 0",
        id="h2-streams",
    ),
    pytest.param(
        GOOD + "http2: {initial_window_size: 4GiB}\n", "http2.initial_window_size: at most 2147483647 bytes",
        id="h2-window",
    ),
    pytest.param(
        GOOD + "http2: {max_streams: 5}\n", "http2.max_streams: unknown key", id="h2-unknown-key",
    ),
    pytest.param(
        GOOD + "    max_resends: !!python/int 3\n", "max_resends: could not determine a constructor", id="tag"
    ),
    pytest.param(
        GOOD + "    poll_interval: -1s\n", "poll_interval: must be more than zero, got '-1s'", id="negative"
    ),
    pytest.param(GOOD + "    poll_interval: true\n", "must be a duration like", id="duration-bool"),
    pytest.param(
        GOOD + "    liveness_timeout: 0s\n", "liveness_timeout: must be more than zero", id="zero-liveness"
    ),
    pytest.param(GOOD + "    resend_body_limit: 5XB\n", "unknown size unit 'XB'", id="size-unit"),
    pytest.param(GOOD + "    resend_body_limit: -5\n", "must be at least 0 bytes", id="size-negative"),
    pytest.param(GOOD + "    resend_body_limit: false\n", "must be a size like 64KiB", id="size-bool"),
    pytest.param(
        GOOD + "    max_resends: 1.5\n", "max_resends: must be a whole number, got 1.5", id="int-float"
    ),
    pytest.param(
        GOOD.replace("id: n2", "id: n1"),
        "test.yaml:8: clusters[0].nodes[1].id: duplicate node id 'n1' (first at line 6)",
        id="duplicate-node-id",
    ),
    pytest.param(GOOD.replace(":7002", ":7001"), "nodes[1].url: duplicate node url", id="duplicate-node-url"),
    pytest.param(GOOD.replace("id: n2", "id: n 2"), "nodes[1].id: must be a name made of", id="bad-node-id"),
    pytest.param(
        GOOD.replace(":7001", ":7001/raft"),
        "nodes[0].url: must be a URL without path, query or fragment",
        id="url-path",
    ),
    pytest.param(GOOD.replace(":7001", ":99999"), "nodes[0].url: must be an http://", id="url-port"),
    pytest.param(
        GOOD.replace("        url: http://127.0.0.1:7002\n", ""),
        "test.yaml:8: clusters[0].nodes[1].url: is required",
        id="missing-url",
    ),
    pytest.param(
        GOOD + "    nodes: []\n",
        "test.yaml:12: clusters[0].nodes: duplicate key 'nodes' (first at line 5)",
        id="duplicate-yaml-key",
    ),
    pytest.param(
        GOOD.replace("127.0.0.1:8080", "8080"), "listeners[0].address: must be host:port", id="address"
    ),
    pytest.param(
        "clusters: []\n", "test.yaml:1: clusters: must be a non-empty list, got a list", id="no-clusters"
    ),
    pytest.param(GOOD.split("clusters:")[0], "test.yaml:1: clusters: is required", id="missing-clusters"),
    pytest.param(
        GOOD + "    reconnect: {min: 3s}\n", "reconnect: min (3s) must not exceed max (2s)", id="reconnect"
    ),
    pytest.param(
        GOOD + "    routes: [{kind: read, policy: bounded}]\n",
        "routes[0].policy: bounded needs max_lag_entries and/or max_lag_ms",
        id="bounded-without-lag",
    ),
    pytest.param(
        GOOD + "    routes: [{kind: read, policy: fenced, max_lag_ms: 5}]\n",
        "routes[0].max_lag_ms: only applies to policy: bounded",
        id="lag-without-bounded",
    ),
    pytest.param(
        GOOD + "    routes: [{kind: write, prefer_followers: false}]\n",
        "routes[0].prefer_followers: only applies to read routes",
        id="read-key-on-write-route",
    ),
    pytest.param(
        GOOD + "    routes: [{kind: read, policy: fast}]\n", "must be one of leader, any,", id="bad-policy"
    ),
    pytest.param(GOOD + "    routes: [{policy: any}]\n", "only applies to read routes", id="policy-on-write"),
    pytest.param(
        GOOD + '    routes: [{path: "^/kv[" }]\n', "routes[0].path: invalid regular expression", id="regex"
    ),
    pytest.param(
        GOOD + "    routes: [{methods: [GET, 'B D']}]\n", "routes[0].methods[1]: must be an HTTP", id="method"
    ),
    pytest.param(GOOD + "    kind: raft\n", "kind: must be one of native, etcd, json, got 'raft'", id="kind"),
    pytest.param(
        GOOD + "  - name: demo\n    nodes: [{id: a, url: 'http://h:1'}]\n",
        "test.yaml:12: clusters[1].name: duplicate cluster name 'demo' (first at line 4)",
        id="duplicate-cluster",
    ),
    pytest.param(
        GOOD + "  - name: other\n    nodes: [{id: a, url: 'http://h:1'}]\n",
        "listeners[0].cluster: is required when there is more than one cluster (demo, other)",
        id="listener-cluster-required",
    ),
    pytest.param(
        GOOD.replace("  - address: 127.0.0.1:8080", "  - {address: '127.0.0.1:8080', cluster: dmeo}"),
        "listeners[0].cluster: unknown cluster 'dmeo' (did you mean demo?)",
        id="listener-unknown-cluster",
    ),
    pytest.param(
        GOOD.replace("listeners:\n", "listeners:\n  - address: 0.0.0.0:8080\n"),
        "test.yaml:3: listeners[1].address: 127.0.0.1:8080 is already used by listeners[0].address",
        id="listener-address-clash",
    ),
    pytest.param(
        GOOD.replace("8080", "9090"),
        "listeners[0].address: 127.0.0.1:9090 is already used by admin.address",
        id="admin-address-clash",
    ),
    pytest.param(
        GOOD + "logging: {level: verbose}\n", "logging.level: must be one of debug,", id="log-level"
    ),
    pytest.param(GOOD + "admin: [1]\n", "admin: must be a mapping, got a list", id="admin-not-mapping"),
    pytest.param(GOOD + "admin: {allowed_hosts: ['raftlb:9090']}\n",
                 "admin.allowed_hosts[0]: must be a host name (no port)", id="admin-allowed-host-port"),
    pytest.param(GOOD + "admin: {allowed_hosts: raftlb}\n", "admin.allowed_hosts: must be a list",
                 id="admin-allowed-hosts-not-a-list"),
    pytest.param(GOOD + "admin: {max_connections: 0}\n", "admin.max_connections: must be at least 1",
                 id="admin-max-connections-zero"),
    pytest.param(GOOD + "workers: 0\n", "test.yaml:12: workers: must be at least 1, got 0",
                 id="workers-zero"),
    pytest.param(GOOD + "workers: 65\n", "workers: at most 64 workers, got 65", id="workers-too-many"),
    pytest.param(GOOD + "workers: two\n", "workers: must be a whole number", id="workers-not-a-number"),
    pytest.param(
        GOOD.replace("127.0.0.1:8080", "127.0.0.1:0") + "workers: 2\n",
        "test.yaml:12: workers: listener listener0 has port 0 (any free port), which 2 workers cannot share",
        id="workers-port-0",
    ),
    pytest.param(
        GOOD + "admin: {address: '0.0.0.0:8077'}\nworkers: 4\n",
        "workers: the admin ports of 4 workers (8077-8080) include listener listener0's port 8080",
        id="workers-admin-ports-clash",
    ),
    pytest.param(
        GOOD + "admin: {address: '127.0.0.1:65535'}\nworkers: 2\n",
        "workers: the admin ports of 2 workers (65535-65536) go past 65535",
        id="workers-admin-ports-past-65535",
    ),
    pytest.param("- 1\n", "test.yaml:1: must be a mapping, got a list", id="top-not-mapping"),
    pytest.param("", "test.yaml: the file is empty", id="empty"),
]


@pytest.mark.parametrize(("text", "expected"), BAD)
def test_bad_configs_name_path_and_line(text: str, expected: str) -> None:
    assert expected in str(error(text))


def test_bad_url_error_carries_path_and_line() -> None:
    exc = error(GOOD.replace("http://127.0.0.1:7003", "htp//x"))
    assert (exc.path, exc.line, exc.file) == ("clusters[0].nodes[2].url", 11, "test.yaml")


def test_missing_env_var_names_variable_and_line() -> None:
    exc = error(GOOD.replace("127.0.0.1:8080", "${RAFTLB_NOT_SET}:8080"))
    assert exc.line == 2 and "RAFTLB_NOT_SET is not set" in str(exc)
    assert str(exc).startswith("test.yaml:2: environment variable RAFTLB_NOT_SET")
    assert "malformed" in str(error(GOOD.replace("127.0.0.1", "${1X}")))


def test_yaml_syntax_error_has_line() -> None:
    exc = error(GOOD.replace("- name: demo", "- name: [demo"))
    assert exc.line is not None and exc.line >= 4 and "invalid YAML" in str(exc)
    exc = error("listeners:\n  - address: a\n - x: : :\n")
    assert exc.line == 3 and str(exc).startswith("test.yaml:3: invalid YAML:")
    exc = error(GOOD + "\x07\n")
    assert str(exc) == "test.yaml:12: invalid YAML: character U+0007 is not allowed"
    exc = error(GOOD + "---\nlisteners: []\n")
    assert exc.line == 12 and "expected a single document" in str(exc)


def test_anchors_merge_and_extension_keys() -> None:
    cfg = parse(
        """\
        x-common: &common {liveness_timeout: 2s, poll_interval: 50ms}
        listeners: [{address: "127.0.0.1:8080", cluster: a}]
        clusters:
          - {<<: *common, name: a, nodes: [{id: n1, url: "http://h:1"}]}
          - {<<: *common, name: b, poll_interval: 1s, nodes: [{id: n1, url: "http://h:2"}]}
        """
    )
    assert [(c.liveness_timeout, c.poll_interval) for c in cfg.clusters] == [(2.0, 0.05), (2.0, 1.0)]


@pytest.mark.parametrize("name", ["example.yaml", "demo.yaml"])
def test_shipped_configs_load(name: str) -> None:
    cfg = load_config(str(CONFIGS / name))
    assert cfg.source == str(CONFIGS / name) and cfg.cluster("demo").nodes


def test_demo_config_matches_the_demo_cluster() -> None:
    cfg = load_config(str(CONFIGS / "demo.yaml"))
    (listener,) = cfg.listeners
    assert (listener.host, listener.port, cfg.admin.port) == ("127.0.0.1", 8080, 9090)
    demo = cfg.cluster("demo")
    assert [n.url for n in demo.nodes] == [f"http://127.0.0.1:{p}" for p in (7001, 7002, 7003)]
    assert (demo.liveness_timeout, demo.hold.timeout, demo.routes[0].policy) == (0.6, 5.0, "fenced")


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    path = str(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="config file not found") as info:
        load_config(path)
    assert info.value.file == path


def test_check_main_ok(capsys: pytest.CaptureFixture[str]) -> None:
    path = str(CONFIGS / "example.yaml")
    assert check_main(path) == 0
    assert capsys.readouterr().out == f"{path}: OK — 1 listener, 1 cluster (demo: 3 nodes, 3 routes)\n"


def test_check_main_reports_bad_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(GOOD.replace("http://127.0.0.1:7003", "htp//x"))
    assert check_main(str(path)) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"raftlb: config error: {path}:11: clusters[0].nodes[2].url: must be an http://")


def test_read_routes_default_to_fenced_and_take_consistency_settings() -> None:
    cfg = parse_config(GOOD + """    fence_wait: 250ms
    index_cookie: true
    routes:
      - {kind: read, path: "^/a"}
      - {kind: read, policy: bounded, max_lag_entries: 100, max_lag_ms: 500, prefer_followers: false,
         cookie: false, fence_wait: 2s}
      - {kind: write}
""")
    c = cfg.clusters[0]
    assert (c.fence_wait, c.index_cookie) == (0.25, True)
    fenced, bounded, write = c.routes
    assert fenced.policy == "fenced" and fenced.prefer_followers and fenced.cookie is None
    assert (bounded.max_lag_entries, bounded.max_lag_ms, bounded.prefer_followers) == (100, 500, False)
    assert (bounded.cookie, bounded.fence_wait) == (False, 2.0)
    assert write.policy == "leader"


@pytest.mark.parametrize(("setting", "margin"), [
    ("", 16),  # the default
    ("    leader_read_margin: 3\n", 3),
    ("    leader_read_margin: never\n", None),  # followers only while one is at the index
    ("    leader_read_margin: Never\n", None),
])
def test_leader_read_margin(setting: str, margin: int | None) -> None:
    assert parse_config(GOOD + setting).clusters[0].leader_read_margin == margin


@pytest.mark.parametrize(("value", "error"), [
    ("0", "leader_read_margin: must be at least 1, got 0"),
    ("soon", "leader_read_margin: must be a whole number or never"),
    ("true", "leader_read_margin: must be a whole number or never"),
    ("1.5", "leader_read_margin: must be a whole number or never"),
])
def test_leader_read_margin_errors(value: str, error: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(error)):
        parse_config(GOOD + f"    leader_read_margin: {value}\n")


def test_announce_auth_takes_one_or_two_keys_and_a_skew() -> None:
    cfg = parse_config(GOOD + """    announce_auth:
      keys: ["0123456789abcdef-old", "0123456789abcdef-new"]
      max_skew: 2s
""")
    c = cfg.clusters[0]
    assert c.announce_keys == (b"0123456789abcdef-old", b"0123456789abcdef-new")
    assert c.announce_max_skew == 2.0
    too_short = r"announce_auth.keys\[0\]: an announcement key must be at least 16"
    with pytest.raises(ConfigError, match=too_short):
        parse_config(GOOD + "    announce_auth: {keys: [short]}\n")
    with pytest.raises(ConfigError, match="at most two keys"):
        three = "[aaaaaaaaaaaaaaaa, bbbbbbbbbbbbbbbb, cccccccccccccccc]"
        parse_config(GOOD + f"    announce_auth: {{keys: {three}}}\n")


def test_check_main_names_the_workers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "w.yaml"
    path.write_text(GOOD + "workers: 3\n")
    assert check_main(str(path)) == 0
    out = capsys.readouterr().out
    assert out == f"{path}: OK — 1 listener, 1 cluster (demo: 3 nodes, 0 routes), 3 workers\n"


def test_workers_default_to_one_and_admin_port_0_or_disabled_admin_need_no_range() -> None:
    assert parse(GOOD).workers == 1
    assert parse(GOOD + "workers: 4\n").workers == 4  # admin 9090-9093, listener 8080
    assert parse(GOOD + "admin: {address: '127.0.0.1:0'}\nworkers: 3\n").workers == 3
    assert parse(GOOD + "admin: {address: '127.0.0.1:8079', enabled: false}\nworkers: 3\n").workers == 3
    # a listener on another address may sit inside the admin range
    assert parse(GOOD.replace("127.0.0.1:8080", "127.0.0.2:9091") + "workers: 4\n").workers == 4


SEVERAL_ERRORS = """\
listeners:
  - address: 127.0.0.1:8080
    cluster: dmeo
    max_connections: 0
clusters:
  - name: demo
    liveness_timeout: soon
    nodes:
      - id: n1
        url: http://127.0.0.1:7001
      - id: n1
        url: htp//x
    routes:
      - methods: [GTE, HEAD]
        kind: read
      - kind: reed
logging: {level: verbose}
bogus: 1
"""


def test_every_error_is_reported_in_file_order() -> None:
    exc = error(SEVERAL_ERRORS)
    lines = str(exc).splitlines()
    assert lines == [
        "test.yaml:3: listeners[0].cluster: unknown cluster 'dmeo' (did you mean demo?)",
        "test.yaml:4: listeners[0].max_connections: must be at least 1, got 0",
        "test.yaml:7: clusters[0].liveness_timeout: "
        "must be a duration like 250ms, 5s, 1m or a number of seconds, got 'soon'",
        "test.yaml:11: clusters[0].nodes[1].id: duplicate node id 'n1' (first at line 9)",
        "test.yaml:12: clusters[0].nodes[1].url: must be an http:// or https:// URL with host and port, "
        "got 'htp//x'",
        "test.yaml:14: clusters[0].routes[0].methods[0]: unknown HTTP method 'GTE' (did you mean GET?)",
        "test.yaml:16: clusters[0].routes[1].kind: must be one of read, write, got 'reed' "
        "(did you mean read?)",
        "test.yaml:17: logging.level: must be one of debug, info, warning, error, got 'verbose'",
        "test.yaml:18: bogus: unknown key (expected one of: listeners, admin, clusters, limits, logging, "
        "drain_timeout, workers, http2)",
    ]
    assert (exc.path, exc.line) == ("listeners[0].cluster", 3)  # the first one


def test_check_prints_every_error_in_file_order(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(SEVERAL_ERRORS)
    assert check_main(str(path)) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 9 and all(line.startswith(f"raftlb: config error: {path}:") for line in err)
    prefix = f"raftlb: config error: {path}:"
    assert [int(line.removeprefix(prefix).split(":")[0]) for line in err] == [3, 4, 7, 11, 12, 14, 16, 17, 18]


@pytest.mark.parametrize("method", ["GTE", "FETCH", "get-"])
def test_unknown_route_methods_are_refused(method: str) -> None:
    exc = error(GOOD + f"    routes: [{{methods: [GET, {method}]}}]\n")
    where = "test.yaml:12: clusters[0].routes[0].methods[1]"
    assert str(exc).startswith(f"{where}: unknown HTTP method {method!r}")


def test_known_route_methods_are_accepted_in_any_case() -> None:
    cfg = parse(GOOD + "    routes: [{methods: [get, PATCH, propfind, DELETE]}]\n")
    assert cfg.clusters[0].routes[0].methods == frozenset({"GET", "PATCH", "PROPFIND", "DELETE"})


def test_routes_take_stream_for_long_lived_answers() -> None:
    cfg = parse_config(GOOD + """    routes:
      - {kind: read, path: "^/v3/watch$", policy: any, stream: true}
      - {path: "^/v3/lease/keepalive$", stream: true}
      - {kind: read}
""")
    watch, keepalive, plain = cfg.clusters[0].routes
    assert (watch.stream, keepalive.stream, plain.stream) == (True, True, False)
    assert keepalive.kind == "write"
    with pytest.raises(ConfigError, match=r"routes\[0\]\.stream"):
        parse_config(GOOD + "    routes: [{stream: sometimes}]\n")
    # The shipped etcd config streams watches through without a gap limit.
    etcd = load_config(str(CONFIGS / "etcd.yaml")).clusters[0]
    assert [r.stream for r in etcd.routes if r.path is not None and r.path.pattern == "^/v3/watch$"] == [True]
