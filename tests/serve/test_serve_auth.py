"""Safe defaults: loopback unless told, a bearer token for anything else."""

from __future__ import annotations

import httpx
import pytest

import mukv
from mukv.cli import main
from mukv.errors import ConfigError
from mukv.serve.config import ServeConfig

TOKEN = "s3cret-token-of-32-characters!!"


def test_public_address_needs_a_token(monkeypatch, capsys, tmp_path):
    monkeypatch.delenv("MUKV_SERVE_TOKEN", raising=False)
    assert ServeConfig.build(store="x").host == "127.0.0.1"
    for host in ("0.0.0.0", "192.168.1.5", "::", "example.org"):
        with pytest.raises(ConfigError, match="needs a bearer token"):
            ServeConfig.build(store="x", host=host)
    for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        assert ServeConfig.build(store="x", host=host).token is None
    assert ServeConfig.build(store="x", host="0.0.0.0", token=TOKEN).token == TOKEN
    monkeypatch.setenv("MUKV_SERVE_TOKEN", TOKEN)
    assert ServeConfig.build(store="x", host="0.0.0.0").token == TOKEN
    monkeypatch.delenv("MUKV_SERVE_TOKEN")
    assert main(["serve", str(tmp_path / "s"), "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mukv: error:") and "bearer token" in err and len(err.strip().splitlines()) == 1
    assert main(["serve", str(tmp_path / "s"), "--token", "short"]) == 2
    assert "short" not in capsys.readouterr().err  # a token is never echoed
    for bad in (["--port", "-1"], ["--max-lag", "0"], ["--thumbnails", "-5"], ["--config", "{bad"]):
        assert main(["serve", str(tmp_path / "s"), *bad]) == 2
        assert capsys.readouterr().err.startswith("mukv: error:")


def test_token_is_required_on_every_route_but_health_and_page(serve):
    with serve(token=TOKEN) as (c, app, url):
        c.create_stream("s")  # the fixture's client carries the token
        for method, path in (("get", "/v1/streams"), ("get", "/v1/streams/s"), ("post", "/v1/streams/s/ask"),
                             ("post", "/v1/streams/s/frames"), ("get", "/metrics"), ("delete", "/v1/streams/s"),
                             ("get", "/v1/streams/s/frames/0.jpg")):
            for headers in ({}, {"Authorization": "Bearer wrong-token-wrong-token"}, {"Authorization": TOKEN},
                            {"Authorization": "Basic " + TOKEN}):
                r = httpx.request(method.upper(), url + path, headers=headers, json={"question": "q"})
                assert r.status_code == 401, (method, path, headers, r.status_code)
                assert r.headers.get("www-authenticate") == "Bearer" and r.json()["error"] == "Unauthorized"
        assert httpx.get(url + "/healthz").status_code == 200
        assert httpx.get(url + "/").status_code == 200
        with pytest.raises(mukv.MukvError) as e:
            mukv.Client(url).streams()
        assert e.value.status == 401
        assert [s["id"] for s in mukv.Client(url, token=TOKEN).streams()] == ["s"]


def test_step_flags_reach_the_engines_scheduler(tmp_path):
    """--encode-batch-frames and --no-answer-during-steps set the batching of the engine's steps;
    bad values are refused like every other flag."""
    import argparse

    from mukv.cli.serve import add_parser, build_config

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    cfg = build_config(parser.parse_args(["serve", str(tmp_path / "s")])).scheduler_config()
    assert cfg.encode_batch_frames == 64 and cfg.lend_between_stages and cfg.withdraw_asked
    args = parser.parse_args(["serve", str(tmp_path / "s"), "--encode-batch-frames", "16", "--no-answer-during-steps"])
    cfg = build_config(args).scheduler_config()
    assert cfg.encode_batch_frames == 16 and not cfg.lend_between_stages and not cfg.withdraw_asked
    with pytest.raises(ConfigError, match="encode_batch_frames"):
        ServeConfig.build(store="x", encode_batch_frames=0)
    assert main(["serve", str(tmp_path / "s"), "--encode-batch-frames", "0"]) == 2


def test_accelerations_are_validated_parsed_and_applied_once_at_load(tmp_path, monkeypatch):
    import argparse

    import mukv.accel
    from mukv.cli.serve import add_parser, build_config
    from mukv.serve.engine import Engine

    for bad in ("fast", ["fused_llm", "nope"], 3, [1]):
        with pytest.raises(ConfigError, match="accelerations"):
            ServeConfig.build(store="x", accelerations=bad)
    assert ServeConfig.build(store="x").accelerations == ()
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    cfg = build_config(parser.parse_args(["serve", str(tmp_path / "s"), "--accel", "fused_llm, fused_norms,fused_llm"]))
    assert cfg.accelerations == ("fused_llm", "fused_norms")
    assert main(["serve", str(tmp_path / "s"), "--accel", "fused_llm,warp"]) == 2  # refused before anything starts
    calls = []
    monkeypatch.setattr(mukv.accel, "accelerate", lambda model, which: calls.append((model, tuple(which))))
    model = object()
    engine = Engine(cfg, model=model)
    engine.model_name = "tiny"
    engine.load()
    engine.load()
    assert calls == [(model, ("fused_llm", "fused_norms"))]


def test_a_server_whose_accelerations_cannot_run_here_refuses_to_start(tmp_path):
    import torch

    from mukv.serve.engine import Engine
    from mukv.session import load_model

    if torch.cuda.is_available():
        pytest.skip("graph_prefill, fused_mlp and fused_rope run on this machine")
    for name, why in (("graph_prefill", "graph_prefill"), ("fused_mlp", "triton|CUDA GPU"),
                      ("fused_rope", "triton|CUDA GPU")):
        engine = Engine(ServeConfig.build(store=str(tmp_path / "s"), accelerations=[name]),
                        model=load_model("tiny-llava-ov", "cpu"))
        with pytest.raises(ConfigError, match=why):
            engine.load()
        assert not (tmp_path / "s").exists()  # nothing written


def test_a_get_on_a_connection_the_server_just_closed_is_sent_once_more():
    import httpx

    from mukv.client import Client, UnreachableError

    sent = []

    def handler(request):
        sent.append(request.url.path)
        if len(sent) == 1:  # the kept-alive connection was closed under the request
            raise httpx.ReadError("connection reset by peer", request=request)
        if request.url.path == "/v1/streams/broken":
            raise httpx.RemoteProtocolError("server disconnected", request=request)
        return httpx.Response(200, json={"streams": []})

    client = Client("http://server")
    client._http = httpx.Client(base_url="http://server", transport=httpx.MockTransport(handler))
    assert client.streams() == [] and sent == ["/v1/streams", "/v1/streams"]
    with pytest.raises(UnreachableError, match="RemoteProtocolError"):  # once more only: a server that keeps
        client.stream("broken")                                          # failing is an error
    assert sent[2:] == ["/v1/streams/broken", "/v1/streams/broken"]
