"""Targets that name several servers: the channel's service config (round_robin with the retry policy), the
plaintext-token guard over every address of a target, the audit's --targets with address lists, and calls
of one client spread over two real gRPC servers on loopback."""

from __future__ import annotations

import json
import re
import threading
from concurrent import futures
from typing import Any

import grpc
import pytest

from cli.audit import parse_targets
from sdk.client import ClientSecurity, EmbeddingClient, _loopback_target, open_channel, service_config, target_hosts
from services.api.v1 import common_pb2


def test_service_config_balances_round_robin_and_retries_unavailable() -> None:
    cfg = json.loads(service_config(4))
    assert cfg["loadBalancingConfig"] == [{"round_robin": {}}]
    (method,) = cfg["methodConfig"]
    assert method["name"] == [{"service": ""}]
    assert method["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert method["retryPolicy"]["maxAttempts"] == 4
    assert json.loads(service_config(0))["methodConfig"][0]["retryPolicy"]["maxAttempts"] == 2


@pytest.mark.parametrize(
    ("target", "hosts"),
    [
        ("127.0.0.1:50051", ["127.0.0.1"]),
        ("localhost:50051", ["localhost"]),
        ("[::1]:50051", ["::1"]),
        ("embedding", ["embedding"]),
        ("dns:///facexplain-embedding-pods.facexplain.svc:50051", ["facexplain-embedding-pods.facexplain.svc"]),
        ("dns://10.96.0.10/facexplain-embedding-pods:50051", ["facexplain-embedding-pods"]),
        ("dns:localhost:50051", ["localhost"]),
        ("ipv4:127.0.0.1:1,127.0.0.2:2", ["127.0.0.1", "127.0.0.2"]),
        ("ipv4:127.0.0.1:1, 10.0.0.7:2", ["127.0.0.1", "10.0.0.7"]),
        ("ipv6:[::1]:1,[::1]:2", ["::1", "::1"]),
        ("unix:/run/facexplain.sock", ["localhost"]),
    ],
)
def test_target_hosts(target: str, hosts: list[str]) -> None:
    assert target_hosts(target) == hosts


@pytest.mark.parametrize(
    ("target", "loopback"),
    [
        ("ipv4:127.0.0.1:1,127.0.0.1:2", True),
        ("ipv6:[::1]:1,[::1]:2", True),
        ("dns:///localhost:50051", True),
        ("ipv4:127.0.0.1:1,10.0.0.7:2", False),  # one address off the machine is enough to refuse
        ("ipv4:10.0.0.7:1,127.0.0.1:2", False),
        ("dns:///facexplain-embedding-pods:50051", False),
        ("dns:///127.0.0.1.nip.io:50051", False),
        ("ipv4:", False),
    ],
)
def test_loopback_needs_every_address_on_loopback(target: str, loopback: bool) -> None:
    assert _loopback_target(target) is loopback


def test_token_guard_over_address_lists(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FACEXPLAIN_ALLOW_INSECURE", raising=False)
    token = ClientSecurity(token="t")
    open_channel("ipv4:127.0.0.1:1,127.0.0.1:2", security=token).close()
    with pytest.raises(
        ValueError, match=re.escape("refusing to send a token in plaintext to ipv4:127.0.0.1:1,10.0.0.7:2")
    ):
        open_channel("ipv4:127.0.0.1:1,10.0.0.7:2", security=token)
    with pytest.raises(ValueError, match="refusing to send a token in plaintext to dns:///facexplain-embedding-pods"):
        open_channel("dns:///facexplain-embedding-pods:50051", security=token)


def test_audit_targets_keep_address_lists() -> None:
    t = parse_targets(["embedding=ipv4:10.0.0.5:50051,10.0.0.6:50051,decoding=h:1", "attributes=dns:///a-pods:50054"])
    assert t["embedding"] == "ipv4:10.0.0.5:50051,10.0.0.6:50051"
    assert t["decoding"] == "h:1" and t["attributes"] == "dns:///a-pods:50054"
    assert t["directions"] == "127.0.0.1:50053"
    assert parse_targets(["10.0.0.9"])["embedding"] == "10.0.0.9:50051"


def _counting_server(counts: dict[int, int], lock: threading.Lock) -> tuple[grpc.Server, int]:
    """A real gRPC server that answers ModelStatus and counts the calls it served, keyed by its port."""
    port_box: list[int] = []

    def status(request: Any, context: grpc.ServicerContext) -> common_pb2.ModelStatusResponse:
        with lock:
            counts[port_box[0]] = counts.get(port_box[0], 0) + 1
        return common_pb2.ModelStatusResponse()

    handler = grpc.method_handlers_generic_handler(
        "facexplain.v1.EmbeddingService",
        {
            "ModelStatus": grpc.unary_unary_rpc_method_handler(
                status,
                request_deserializer=common_pb2.ModelStatusRequest.FromString,
                response_serializer=common_pb2.ModelStatusResponse.SerializeToString,
            )
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(2), handlers=[handler])
    port_box.append(server.add_insecure_port("127.0.0.1:0"))
    server.start()
    return server, port_box[0]


def test_one_client_spreads_calls_over_every_address() -> None:
    counts: dict[int, int] = {}
    lock = threading.Lock()
    servers = [_counting_server(counts, lock) for _ in range(2)]
    try:
        target = "ipv4:" + ",".join(f"127.0.0.1:{port}" for _, port in servers)
        with EmbeddingClient(target, timeout=10, security=ClientSecurity()) as client:
            for _ in range(40):
                client.model_status()
        # round_robin takes the addresses in turn once both are connected; pick_first would send all 40 to one
        assert sorted(counts) == sorted(port for _, port in servers), counts
        assert min(counts.values()) >= 10, counts
    finally:
        for server, _ in servers:
            server.stop(None)


def test_audit_embedding_flags() -> None:
    from cli.audit import config_from_args
    from cli.main import build_parser

    base = ["audit", "--fr-model", "m@champion", "--data", "d", "--out", "o"]
    parser = build_parser(with_training=False)
    cfg = config_from_args(parser.parse_args(base))
    assert (cfg.embed_chunk, cfg.embed_concurrency) == (16, 4)
    cfg = config_from_args(parser.parse_args([*base, "--embed-chunk", "8", "--embed-concurrency", "2"]))
    assert (cfg.embed_chunk, cfg.embed_concurrency) == (8, 2)
    assert "embed_concurrency" not in cfg.public() and cfg.public()["embed_chunk"] == 8
    with pytest.raises(SystemExit):
        parser.parse_args([*base, "--embed-concurrency", "0"])


def test_the_e2e_suite_reads_replica_lists_in_its_targets_as_the_audit_does() -> None:
    from tests.e2e.conftest import parse_targets as e2e_targets

    text = "embedding=ipv4:10.0.0.5:50051,10.0.0.6:50051,decoding=h:1,directions=h:2,attributes=h:3,counterfactual=h:4"
    t = e2e_targets(text)
    assert t["embedding"] == "ipv4:10.0.0.5:50051,10.0.0.6:50051"
    assert t["decoding"] == "h:1" and t["counterfactual"] == "h:4"
    with pytest.raises(pytest.UsageError, match="bad entry"):
        e2e_targets("embedding=h:0,10.0.0.6:50051,decoding=h:1")  # a bare address continues only an ipv4: list
