"""The HTTP API against a real uvicorn server on 127.0.0.1 (a free port), driven with httpx."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from serving.api import RecommendationOut, create_app, serve_in_thread
from serving.service import RecommendationService
from serving.settings import ServingSettings
from stream.events import EmbeddingUpdate

TOKEN = "test-admin-token-0123456789"


@pytest.fixture(scope="module")
def service() -> RecommendationService:
    service = RecommendationService(dim=2, popularity_refresh_s=0.0)
    service.apply_updates(
        [
            EmbeddingUpdate("item", "a", 4, 1, (1.0, 0.0)),
            EmbeddingUpdate("item", "b", 4, 1, (0.0, 1.0)),
            EmbeddingUpdate("item", "c", 4, 1, (0.5, 0.25)),
            EmbeddingUpdate("user", "u1", 4, 2, (1.0, 0.0, 0.0, 0.75)),
        ]
    )
    service.record_consumed("u1", ["a"])
    service.record_popularity(["b", "b", "c"])
    return service


@pytest.fixture(scope="module")
def client(
    service: RecommendationService, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[httpx.Client]:
    snapshot = tmp_path_factory.mktemp("snap") / "serving.npz"
    settings = ServingSettings(admin_token=TOKEN, snapshot_path=snapshot, port=0)
    handle = serve_in_thread(create_app(service, settings), settings.host, settings.port)
    try:
        with httpx.Client(base_url=handle.url, timeout=10.0) as client:
            yield client
    finally:
        handle.stop()


def test_recommend_known_user_is_served_by_the_model(client: httpx.Client) -> None:
    response = client.get("/recommend", params={"user_id": "u1", "k": 5})
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert RecommendationOut.model_validate(body).model_dump() == body  # the documented schema, nothing more
    assert body["served_by"] == "model"
    assert body["items"] == [{"item_id": "b", "score": 0.75}, {"item_id": "c", "score": 0.5}]  # "a" consumed
    assert body["index"]["version"] == 4
    assert body["index"]["items"] == 3
    assert 0.0 <= body["index"]["age_s"] < 600.0


def test_recommend_unknown_user_falls_back_to_popularity(client: httpx.Client) -> None:
    body = client.get("/recommend", params={"user_id": "someone-new"}).json()
    assert body["served_by"] == "popularity"
    assert body["k"] == 10
    assert body["items"] == [
        {"item_id": "b", "score": 2.0},
        {"item_id": "a", "score": 1.0},
        {"item_id": "c", "score": 1.0},
    ]


@pytest.mark.parametrize(
    ("params", "detail"),
    [
        ({"user_id": "u1", "k": "0"}, "query parameter 'k': received '0', allowed: an integer in 1..1000"),
        (
            {"user_id": "u1", "k": "1001"},
            "query parameter 'k': received '1001', allowed: an integer in 1..1000",
        ),
        (
            {"user_id": "u1", "k": "ten"},
            "query parameter 'k': received 'ten', allowed: an integer in 1..1000",
        ),
        ({"k": "3"}, "query parameter 'user_id': received nothing, allowed: a string of 1..256 characters"),
        ({"user_id": ""}, "query parameter 'user_id': received '', allowed: a string of 1..256 characters"),
        (
            {"user_id": "x" * 257},
            "query parameter 'user_id': received a string of 257 characters, allowed: a string of 1..256 characters",
        ),
    ],
)
def test_bad_parameters_get_422_naming_parameter_received_and_allowed(
    client: httpx.Client, params: dict[str, str], detail: str
) -> None:
    response = client.get("/recommend", params=params)
    assert response.status_code == 422
    assert response.json()["detail"] == detail


def test_healthz_reports_index_state(client: httpx.Client) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200
    body = response.json()
    assert {k: body[k] for k in ("status", "index_version", "index_items", "users", "ready")} == {
        "status": "ok",
        "index_version": 4,
        "index_items": 3,
        "users": 1,
        "ready": True,
    }


def test_served_by_follows_the_ranker_the_learner_chose(client: httpx.Client, service: RecommendationService) -> None:
    """u1 consumed a; u2 consumed a then c, so c co-occurs with a. The learner's choice switches the answers."""
    service.record_consumed("u2", ["a", "c"])
    try:
        assert service.set_ranker("cooccurrence")
        body = client.get("/recommend", params={"user_id": "u1", "k": 5}).json()
        assert body["served_by"] == "cooccurrence"
        assert [it["item_id"] for it in body["items"]] == ["c"]  # a consumed; only consumed items are known
        assert client.get("/healthz").json()["ranker"] == "cooccurrence"
        assert client.get("/recommend", params={"user_id": "nobody"}).json()["served_by"] == "popularity"
        assert service.set_ranker("popularity")
        body = client.get("/recommend", params={"user_id": "u1", "k": 2}).json()
        assert (body["served_by"], [it["item_id"] for it in body["items"]]) == ("popularity", ["b", "c"])
        metrics = client.get("/metrics").text
        assert 'sitn_serving_ranker{served_by="popularity"} 1.0' in metrics
        assert 'sitn_serving_recommendations_total{served_by="cooccurrence"}' in metrics
    finally:
        service.set_ranker("model")
    body = client.get("/recommend", params={"user_id": "u1", "k": 5}).json()
    assert body["served_by"] == "model"
    assert client.get("/healthz").json()["ranker"] == "model"


def test_served_by_can_be_the_fused_ranker(client: httpx.Client, service: RecommendationService) -> None:
    """With weight 0 the fused score is z(model) alone: u1's best views give a 1, b 0.75, c 0.5 (mean 0.75,
    std sqrt(1/24)); a is consumed."""
    try:
        assert service.set_ranker("fused", fused_weight=0.0)
        body = client.get("/recommend", params={"user_id": "u1", "k": 5}).json()
        assert (body["served_by"], [it["item_id"] for it in body["items"]]) == ("fused", ["b", "c"])
        assert [it["score"] for it in body["items"]] == pytest.approx([0.0, -0.25 * 24**0.5], abs=1e-6)
        health = client.get("/healthz").json()
        assert (health["ranker"], health["fused_weight"]) == ("fused", 0.0)
        metrics = client.get("/metrics").text
        assert 'sitn_serving_ranker{served_by="fused"} 1.0' in metrics
        assert 'sitn_serving_recommendations_total{served_by="fused"}' in metrics
    finally:
        service.set_ranker("model", fused_weight=1.0)
    assert client.get("/recommend", params={"user_id": "u1", "k": 5}).json()["served_by"] == "model"


def test_metrics_exposition_contains_the_serving_metrics(client: httpx.Client) -> None:
    client.get("/recommend", params={"user_id": "u1"})
    client.get("/no/such/route")
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    for name in (
        "sitn_serving_http_request_seconds_bucket",
        "sitn_serving_recommendations_total",
        "sitn_serving_index_version 4.0",
        "sitn_serving_index_items 3.0",
        "sitn_serving_index_age_seconds",
    ):
        assert name in text, name
    assert 'route="/recommend",status="200"' in text
    assert 'route="unmatched",status="404"' in text  # unknown paths share one bounded label
    assert "/no/such/route" not in text


def test_openapi_docs_list_the_routes(client: httpx.Client) -> None:
    spec = client.get("/openapi.json").json()
    assert {"/recommend", "/healthz", "/metrics", "/admin/snapshot", "/admin/reload"} <= set(spec["paths"])
    assert client.get("/docs").status_code == 200


@pytest.mark.parametrize("path", ["/admin/snapshot", "/admin/reload"])
def test_admin_needs_the_bearer_token(client: httpx.Client, path: str) -> None:
    missing = client.post(path)
    assert missing.status_code == 401
    assert missing.json()["detail"] == "missing bearer token"
    wrong = client.post(path, headers={"Authorization": "Bearer not-the-token"})
    assert wrong.status_code == 403
    assert wrong.json()["detail"] == "invalid bearer token"


def test_admin_snapshot_then_reload_with_the_token(client: httpx.Client) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    saved = client.post("/admin/snapshot", headers=auth)
    assert saved.status_code == 200
    assert {k: saved.json()[k] for k in ("version", "items", "users")} == {
        "version": 4,
        "items": 3,
        "users": 1,
    }
    assert Path(saved.json()["path"]).is_file()
    before = client.get("/recommend", params={"user_id": "u1"}).json()["items"]
    reloaded = client.post("/admin/reload", headers=auth)
    assert reloaded.status_code == 200
    assert client.get("/recommend", params={"user_id": "u1"}).json()["items"] == before


def test_admin_is_disabled_without_a_configured_token(service: RecommendationService) -> None:
    handle = serve_in_thread(create_app(service, ServingSettings(port=0)))
    try:
        response = httpx.post(f"{handle.url}/admin/snapshot", headers={"Authorization": f"Bearer {TOKEN}"})
        assert response.status_code == 403
        assert response.json()["detail"] == "admin endpoints are disabled: set SITN_SERVING_ADMIN_TOKEN"
    finally:
        handle.stop()
