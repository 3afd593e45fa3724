"""Property-based fuzzing of every HTTP parameter, against the real app on a real uvicorn server.

Requests are written with ``http.client`` so that the query string goes on the wire exactly as generated
(httpx would normalise it): arbitrary unicode and arbitrary bytes (percent-encoded, the only way bytes
outside printable ASCII can be in a request target), raw ``&``/``=``/``+``/``%``/``;`` characters,
strings up to 60,000 characters, repeated and unknown parameters, every method.

Properties:

* ``/recommend``: the status is 200 or 422, never 5xx. 200 only if the last ``user_id`` (the value
  Starlette reads, as :func:`urllib.parse.parse_qsl` decodes it) has 1..256 characters, and the body
  echoes it and a ``k`` in 1..1000 that the ``k`` text denotes; a plain decimal ``k`` in 1..1000 with a
  good ``user_id`` is always 200. A 422 body is JSON whose ``detail`` names each bad parameter, what
  was received and what is allowed.
* ``/admin/*``: with any ``Authorization`` headers that do not contain the token (none, other schemes,
  wrong or mutated tokens, several headers) and any query (``?token=<the token>`` included) the answer is
  401 or 403 with the JSON reason, never a 2xx.
* ``/healthz``, ``/metrics``: 200 whatever the query; other methods get a JSON 405.

Request targets longer than uvicorn's limit (about 64 KiB) and bytes that HTTP forbids in a request
line never reach the app: uvicorn answers a plain-text 400 itself (``test_protocol_errors_...``).

Fuzzing volume (``EXAMPLES``, fixed seed via ``derandomize``): 1,000 /recommend queries + 600 admin
requests + 200 other-route requests = 1,800 fuzzed HTTP requests per run; about 25 s of CPU, 30-60 s of
wall time on the shared 2-core machine depending on its load.
"""

from __future__ import annotations

import http.client
import json
import re
import socket
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, quote_from_bytes

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from serving.api import ServerHandle, create_app, serve_in_thread
from serving.service import MAX_K, RecommendationService
from serving.settings import ServingSettings
from stream.events import MAX_ID_CHARS, EmbeddingUpdate

TOKEN = "fuzz-admin-token-0123456789abcdef"
EXAMPLES = {"recommend": 1000, "admin": 600, "other": 200}
FUZZ = settings(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
UVICORN_400 = b"Invalid HTTP request received."


@dataclass(frozen=True)
class Reply:
    status: int
    content_type: str
    body: bytes

    def json(self) -> Any:
        assert self.content_type == "application/json", (self.status, self.content_type, self.body[:200])
        return json.loads(self.body)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerHandle]:
    service = RecommendationService(dim=2, popularity_refresh_s=0.0)
    service.apply_updates(
        [
            EmbeddingUpdate("item", "a", 1, 1, (1.0, 0.0)),
            EmbeddingUpdate("item", "b", 1, 1, (0.0, 1.0)),
            EmbeddingUpdate("user", "u1", 1, 1, (1.0, 0.5)),
        ]
    )
    service.record_popularity(["b", "a", "b"])
    snapshot = tmp_path_factory.mktemp("fuzz-http") / "serving.npz"
    settings_ = ServingSettings(admin_token=TOKEN, snapshot_path=snapshot, port=0)
    handle = serve_in_thread(create_app(service, settings_), settings_.host, settings_.port)
    try:
        yield handle
    finally:
        handle.stop()


def request(
    server: ServerHandle, method: str, target: str, headers: Sequence[tuple[str, bytes]] = ()
) -> Reply:
    """One request, with ``target`` sent byte for byte (``http.client`` only refuses control characters)."""
    conn = http.client.HTTPConnection(server.host, server.port, timeout=10)
    try:
        conn.putrequest(method, target, skip_host=False, skip_accept_encoding=True)
        for name, value in headers:
            conn.putheader(name, value)
        conn.endheaders()
        response = conn.getresponse()
        body = response.read()
        content_type = (response.getheader("content-type") or "").split(";")[0]
        return Reply(response.status, content_type, body)
    finally:
        conn.close()


def assert_json_error(reply: Reply, statuses: tuple[int, ...]) -> dict[str, Any]:
    assert reply.status in statuses, (reply.status, reply.body[:300])
    body = reply.json()
    assert isinstance(body["detail"], str) and body["detail"], body
    return body


# --- /recommend --------------------------------------------------------------------------------------

any_text = st.text(max_size=40)  # every code point but surrogates, percent-encoded as UTF-8
raw_bytes = st.binary(max_size=40).map(lambda b: quote_from_bytes(b, safe=""))  # may be invalid UTF-8
huge = st.sampled_from([MAX_ID_CHARS - 1, MAX_ID_CHARS, MAX_ID_CHARS + 1, 4096, 50_000]).map(
    lambda n: "x" * n
)
huge_unicode = st.sampled_from([MAX_ID_CHARS, MAX_ID_CHARS + 1, 9000]).map(lambda n: quote("é" * n))
# Unencoded printable ASCII, so that '&', '=', '+', ';', '%' and '%zz' reach the server's query parser raw.
raw_ascii = st.text(
    alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="#"), max_size=20
)
small_values = any_text.map(lambda s: quote(s, safe="")) | raw_bytes | raw_ascii
values = small_values | huge | huge_unicode  # at most one huge value per request: under uvicorn's 64 KiB
k_values = (
    st.integers(-(2**70), 2**70).map(str)
    | st.integers(0, MAX_K + 1).map(str)
    | st.floats(allow_nan=True).map(str)
    | st.sampled_from(
        ["1.0", "+5", " 5 ", "1_0", "1e3", "0x10", "-0", "true", "", "٣", "５", "10.5", "NaN", "inf"]
    )
    | any_text
).map(lambda s: quote(s, safe=""))
names = st.sampled_from(["user_id", "k", "K", "user_id[]", "userid", "extra", ""]) | any_text.map(
    lambda s: quote(s, safe="")
)


@st.composite
def recommend_queries(draw: st.DrawFn) -> str:
    """A query string of 0..6 ``name=value`` pairs, mostly including ``user_id`` and ``k``."""
    pairs = []
    if draw(st.sampled_from([True, True, True, False])):
        pairs.append(("user_id", draw(values | st.just("u1"))))
    if draw(st.booleans()):
        pairs.append(("k", draw(k_values)))
    pairs += draw(st.lists(st.tuples(names, small_values | k_values), max_size=4))
    order = draw(st.permutations(range(len(pairs))))
    return "&".join(
        f"{pairs[i][0]}={pairs[i][1]}" if draw(st.booleans()) or i < 2 else pairs[i][0] for i in order
    )


def denotes(k_text: str, k: int) -> bool:
    """Whether ``k_text`` is a lax spelling of the integer ``k`` (" 5", "+5", "5.0", "5_0" for 50)."""
    try:
        return Decimal(k_text.strip().replace("_", "")) == k
    except InvalidOperation:
        return False


@settings(FUZZ, max_examples=EXAMPLES["recommend"])
@given(query=recommend_queries(), method=st.sampled_from(["GET", "GET", "GET", "POST", "PUT", "DELETE"]))
def test_recommend_answers_200_or_a_json_4xx_for_any_query(
    server: ServerHandle, query: str, method: str
) -> None:
    reply = request(server, method, f"/recommend?{query}")
    if method != "GET":
        assert assert_json_error(reply, (405,))["detail"] == "Method Not Allowed"
        return
    params = dict(parse_qsl(query, keep_blank_values=True))  # what Starlette reads: the last value wins
    user_id, k_text = params.get("user_id"), params.get("k")
    user_ok = user_id is not None and 1 <= len(user_id) <= MAX_ID_CHARS
    k_plain = k_text is None or (
        re.fullmatch(r"[0-9]{1,4}", k_text) is not None and 1 <= int(k_text) <= MAX_K
    )
    event(f"status={reply.status}")
    if reply.status == 200:
        body = reply.json()
        assert user_ok and body["user_id"] == user_id
        assert 1 <= body["k"] <= MAX_K and len(body["items"]) <= body["k"]
        assert body["k"] == 10 if k_text is None else denotes(k_text, body["k"]), (k_text, body["k"])
        assert body["served_by"] == ("model" if user_id == "u1" else "popularity")
        return
    body = assert_json_error(reply, (422,))
    assert not (user_ok and k_plain), (query, body)
    bad = {problem["parameter"] for problem in body["errors"]}
    assert bad <= {"user_id", "k"} and bad, body
    assert ("user_id" in bad) == (not user_ok), (user_id, body)
    for problem in body["errors"]:
        assert f"query parameter {problem['parameter']!r}: received " in body["detail"]
        assert problem["allowed"] in body["detail"]


def test_recommend_lax_integer_spellings_are_the_integer(server: ServerHandle) -> None:
    """What the fuzzing found pydantic accepts for ``k``: whitespace, a sign, ``.0`` and digit separators."""
    for k_text, k in [("%205%20", 5), ("%2B5", 5), ("1.0", 1), ("1_0", 10)]:
        assert request(server, "GET", f"/recommend?user_id=u1&k={k_text}").json()["k"] == k
    for k_text in ["1e1", "0x10", "5.5", "-0", "%EF%BC%95"]:  # the last is a fullwidth digit five
        assert_json_error(request(server, "GET", f"/recommend?user_id=u1&k={k_text}"), (422,))


def test_repeated_parameters_last_one_wins(server: ServerHandle) -> None:
    body = request(server, "GET", "/recommend?user_id=nobody&k=7&user_id=u1&k=1").json()
    assert (body["user_id"], body["k"], body["served_by"]) == ("u1", 1, "model")


def test_protocol_errors_are_answered_by_uvicorn_and_the_server_keeps_serving(server: ServerHandle) -> None:
    """Requests that are not HTTP never reach the app: uvicorn answers 400 in plain text and goes on."""
    too_long = request(server, "GET", "/recommend?user_id=" + "x" * 70_000)  # request line > 64 KiB
    assert (too_long.status, too_long.body) == (400, UVICORN_400)
    for line in [
        b"GET /recommend?user_id=\xff\xfe HTTP/1.1",
        b"GET /recommend?user_id=a\x00b HTTP/1.1",
        b"\x00\x01",
    ]:
        with socket.create_connection((server.host, server.port), timeout=10) as sock:
            sock.sendall(line + b"\r\nHost: x\r\nConnection: close\r\n\r\n")
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n") and answer.endswith(UVICORN_400), answer
    assert request(server, "GET", "/healthz").json()["status"] == "ok"


# --- /admin ------------------------------------------------------------------------------------------

# Header values: printable latin-1 (what HTTP headers carry), never containing the token itself.
header_text = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=60
)
mutated_tokens = st.sampled_from(
    [
        TOKEN[:-1],
        TOKEN[1:],
        TOKEN.upper(),
        TOKEN[:-1] + "X",
        "",
        " ",
        TOKEN.replace("-", "_"),
        TOKEN[:16],
        "\u00e9" + TOKEN[1:],
    ]
)
authorization = (
    header_text
    | st.builds("Bearer {}".format, header_text | mutated_tokens)
    | st.builds(
        "{} {}".format,
        st.sampled_from(["Basic", "Token", "Bearer:", "Bearer\t", "Digest", ""]),
        st.just(TOKEN),
    )
    | st.builds("{}{}".format, st.just("Bearer"), st.just(TOKEN))  # no space
).filter(lambda value: TOKEN not in value or not value.lower().startswith("bearer "))


@settings(FUZZ, max_examples=EXAMPLES["admin"])
@given(
    path=st.sampled_from(["/admin/snapshot", "/admin/reload"]),
    method=st.sampled_from(["POST", "POST", "POST", "POST", "POST", "GET", "PUT"]),
    auth=st.lists(authorization, max_size=3),
    query=st.sampled_from(
        ["", f"?token={TOKEN}", f"?access_token={TOKEN}", f"?authorization=Bearer%20{TOKEN}"]
    )
    | recommend_queries().map(lambda q: f"?{q}"),
)
def test_admin_never_succeeds_without_the_token(
    server: ServerHandle, path: str, method: str, auth: list[str], query: str
) -> None:
    reply = request(
        server, method, path + query, [("Authorization", value.encode("latin-1")) for value in auth]
    )
    event(f"status={reply.status}")
    if method != "POST":
        assert assert_json_error(reply, (405,))["detail"] == "Method Not Allowed"
        return
    body = assert_json_error(reply, (401, 403))
    # FastAPI's HTTPBearer reads the first header; a value that is not "Bearer <credentials>" is no token.
    # The HTTP parser strips spaces and tabs around a header value; FastAPI then splits at the first space.
    first = auth[0].strip(" \t") if auth else ""
    scheme, _, credentials = first.partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        assert (reply.status, body["detail"]) == (403, "invalid bearer token"), auth
    else:
        assert (reply.status, body["detail"]) == (401, "missing bearer token"), auth


def test_admin_succeeds_with_the_token(server: ServerHandle) -> None:
    """The other side of the property above: the same requests with the right token do succeed."""
    auth = [("Authorization", f"Bearer {TOKEN}".encode())]
    saved = request(server, "POST", "/admin/snapshot", auth)
    assert saved.status == 200 and Path(saved.json()["path"]).is_file()
    assert request(server, "POST", "/admin/reload?token=junk&k=-1", auth).json()["items"] == 2


# --- other routes ------------------------------------------------------------------------------------


@settings(FUZZ, max_examples=EXAMPLES["other"])
@given(
    path=st.sampled_from(["/healthz", "/metrics"]),
    method=st.sampled_from(["GET", "GET", "POST", "DELETE"]),
    query=recommend_queries(),
)
def test_health_and_metrics_ignore_any_query(
    server: ServerHandle, path: str, method: str, query: str
) -> None:
    reply = request(server, method, f"{path}?{query}")
    if method != "GET":
        assert assert_json_error(reply, (405,))["detail"] == "Method Not Allowed"
    elif path == "/healthz":
        assert reply.status == 200 and reply.json()["ready"] is True
    else:
        assert reply.status == 200 and b"sitn_serving_index_items 2.0" in reply.body
