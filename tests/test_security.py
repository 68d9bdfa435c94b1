"""TLS (server certificate, optional client certificates) and bearer-token authentication.

Certificates are made at test time with the `cryptography` package: a CA, a server
certificate for 127.0.0.1/localhost, a client certificate, and a rogue CA's client certificate.
"""

from __future__ import annotations

import datetime
import ipaddress
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from protoserve_client import ExplainerClient, ExplainerError, pb, pb_grpc

from conftest import RunningServer, free_port
from server.security import (BearerTokens, DecodeGuardInterceptor, SecurityConfigError, WrappedHandlers,
                             load_tokens, server_credentials)
from server.settings import Settings
from test_shutdown import REFUSAL_RSS_BOUND_MIB, PeakRss, rss_mib, send_large_messages, serve_process

TOKEN = "s3cret-token-for-tests-0123456789"
OTHER_TOKEN = "rotated-token-for-tests-9876543210"
EXPLAINER = "protoserve.v1.Explainer"
X = np.zeros((1, 28, 28), np.float32)


# ----------------------------------------------------------------------------- certificates

def _name(common_name: str):
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _pem_key(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _pem_cert(cert) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM)


def _ca(common_name: str):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(_name(common_name))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return key, cert


def _leaf(ca_key, ca_cert, common_name: str, server: bool):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID

    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(ca_cert.subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server
                                                     else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                              critical=False))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


@pytest.fixture(scope="module")
def token_file(tmp_path_factory) -> Path:
    tokens = tmp_path_factory.mktemp("tokens") / "tokens"
    tokens.write_text(f"# accepted bearer tokens, one per line\n{TOKEN}\n\n{OTHER_TOKEN}\n")
    return tokens


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    pytest.importorskip("cryptography", reason="the TLS tests make certificates with `cryptography` (test extra)")
    folder = tmp_path_factory.mktemp("pki")
    ca_key, ca_cert = _ca("protoserve test CA")
    rogue_key, rogue_cert = _ca("rogue CA")
    files = {}
    for label, (key, cert) in {
        "ca": (ca_key, ca_cert),
        "server": _leaf(ca_key, ca_cert, "protoserve server", server=True),
        "client": _leaf(ca_key, ca_cert, "protoserve client", server=False),
        "rogue_client": _leaf(rogue_key, rogue_cert, "rogue client", server=False),
        "rogue_ca": (rogue_key, rogue_cert),
    }.items():
        files[f"{label}.key"] = folder / f"{label}.key"
        files[f"{label}.crt"] = folder / f"{label}.crt"
        files[f"{label}.key"].write_bytes(_pem_key(key))
        files[f"{label}.crt"].write_bytes(_pem_cert(cert))
    return files


def _running(demo_store: Path, **settings) -> RunningServer:
    return RunningServer(Settings(model_store=demo_store, port=0, metrics_port=0, shutdown_grace_s=2.0, **settings))


@pytest.fixture(scope="module")
def tls_server(demo_store, pki, token_file):
    running = _running(demo_store, tls_cert=pki["server.crt"], tls_key=pki["server.key"],
                       auth_token_file=token_file)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def mtls_server(demo_store, pki):
    running = _running(demo_store, tls_cert=pki["server.crt"], tls_key=pki["server.key"],
                       tls_client_ca=pki["ca.crt"])
    yield running
    running.stop()


@pytest.fixture(scope="module")
def token_server(demo_store, token_file):
    """Tokens without TLS (loopback only)."""
    running = _running(demo_store, auth_token_file=token_file)
    yield running
    running.stop()


def _credentials(pki, ca="ca", client: str | None = None) -> grpc.ChannelCredentials:
    kwargs = {}
    if client:
        kwargs = {"private_key": pki[f"{client}.key"].read_bytes(),
                  "certificate_chain": pki[f"{client}.crt"].read_bytes()}
    return grpc.ssl_channel_credentials(root_certificates=pki[f"{ca}.crt"].read_bytes(), **kwargs)


def _code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value.code()


# ----------------------------------------------------------------------------- tokens

@pytest.mark.parametrize("secure", [True, False], ids=["tls", "plaintext-loopback"])
def test_rpcs_need_a_valid_bearer_token(request, secure):
    running = request.getfixturevalue("tls_server" if secure else "token_server")
    credentials = _credentials(request.getfixturevalue("pki")) if secure else None
    with ExplainerClient(running.address, credentials=credentials, timeout=30) as anonymous:
        assert _code(lambda: anonymous.list_models()) == grpc.StatusCode.UNAUTHENTICATED
        assert _code(lambda: anonymous.explain(X, model="mnist")) == grpc.StatusCode.UNAUTHENTICATED
        # A refused request is not even parsed: garbage bytes get the same answer.
        raw = anonymous._channel.unary_unary(f"/{EXPLAINER}/Predict")
        assert _code(lambda: raw(b"\xff\xfe", timeout=30)) == grpc.StatusCode.UNAUTHENTICATED
        stream = anonymous.explain_stream(iter([pb.ExplainRequest(model="mnist")]), timeout=30)
        assert _code(lambda: list(stream)) == grpc.StatusCode.UNAUTHENTICATED
    with ExplainerClient(running.address, credentials=credentials, token="wrong-token-of-enough-length",
                         timeout=30) as wrong:
        with pytest.raises(grpc.RpcError) as caught:
            wrong.predict(X, model="mnist")
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "bearer" in caught.value.details().lower()
    for token in (TOKEN, OTHER_TOKEN):  # every token in the file is accepted (rotation)
        with ExplainerClient(running.address, credentials=credentials, token=token, timeout=30) as good:
            assert "mnist" in [m.name for m in good.list_models().models]
            response = good.explain(X, model="mnist", heatmaps="none")
            assert response.prediction and response.components


def test_unauthenticated_messages_are_refused_before_they_are_read(tmp_path, token_file):
    """48 unauthenticated messages of 60 MiB and 8 gzip-compressed ones (60 MiB inflated), 8 at a time:
    UNAUTHENTICATED from the headers, and the server's RSS grows by far less than one message (it
    grew by 2.2 GB when the message was read before the token was checked)."""
    store = tmp_path / "store"
    store.mkdir()
    process, address = serve_process(store, tmp_path / "server.log", "--auth-token-file", str(token_file))
    try:
        unauthenticated = {grpc.StatusCode.UNAUTHENTICATED: 1}
        assert send_large_messages(address, 1, grpc.Compression.NoCompression) == unauthenticated  # warm-up
        start = rss_mib(process.pid)
        with PeakRss(process.pid) as rss:
            plain = send_large_messages(address, 48, grpc.Compression.NoCompression)
            gzip = send_large_messages(address, 8, grpc.Compression.Gzip)
            wrong = send_large_messages(address, 8, grpc.Compression.NoCompression,
                                        metadata=(("authorization", "Bearer wrong-token-of-enough-length"),))
        print(f"unauthenticated: 64 x 60 MiB refused; server RSS {start:.0f} MiB -> peak {rss.peak:.0f} MiB")
        assert plain == {grpc.StatusCode.UNAUTHENTICATED: 48}
        assert gzip == wrong == {grpc.StatusCode.UNAUTHENTICATED: 8}
        assert rss.peak - start < REFUSAL_RSS_BOUND_MIB, (start, rss.peak)
        # A request stream without a token is refused before its first message is read, too.
        with grpc.insecure_channel(address) as channel:
            requests = (pb.ExplainRequest(model="mnist", request_id=str(i)) for i in range(100_000))
            stream = pb_grpc.ExplainerStub(channel).ExplainStream(requests, timeout=60)
            assert _code(lambda: list(stream)) == grpc.StatusCode.UNAUTHENTICATED
        # With the token, the same bytes are read (and found not to be a protobuf message).
        with grpc.insecure_channel(address) as channel:
            predict = channel.unary_unary(f"/{EXPLAINER}/Predict")
            assert _code(lambda: predict(b"\xff" * 1024, timeout=30, metadata=(
                ("authorization", f"Bearer {TOKEN}"),))) == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        process.terminate()
        process.wait(timeout=60)


def test_health_and_reflection_stay_open(tls_server, pki):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with grpc.secure_channel(tls_server.address, _credentials(pki)) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", EXPLAINER):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=30)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        assert EXPLAINER in ProtoReflectionDescriptorDatabase(channel).get_services()


def test_the_scheme_is_case_insensitive_and_the_token_exact():
    tokens = BearerTokens([TOKEN.encode()])
    assert tokens.authorized([("authorization", f"Bearer {TOKEN}")])
    assert tokens.authorized([("authorization", f"bearer {TOKEN}")])
    assert tokens.authorized([("x-other", "1"), ("Authorization", f"BEARER  {TOKEN} ")])
    for value in (TOKEN, f"Basic {TOKEN}", f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}", "Bearer ", "",
                  f"Bearer {TOKEN.upper()}"):
        assert not tokens.authorized([("authorization", value)]), value
    assert not tokens.authorized([])
    assert not tokens.authorized(None)


@settings(max_examples=300, deadline=None)
@given(noise=st.lists(st.tuples(st.text(max_size=20), st.one_of(st.text(max_size=80), st.binary(max_size=80))),
                      max_size=4),
       position=st.integers(0, 4), scheme=st.sampled_from(["Bearer", "bearer", "BEARER"]))
def test_any_metadata_is_parsed_and_only_the_first_authorization_counts(noise, position, scheme):
    tokens = BearerTokens([TOKEN.encode()])
    assert tokens.authorized(noise) is False
    metadata = noise[:position] + [("authorization", f"{scheme} {TOKEN}")] + noise[position:]
    earlier = any(key.lower() == "authorization" for key, _ in noise[:position])
    assert tokens.authorized(metadata) is (not earlier)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(method=st.one_of(st.sampled_from([f"/{EXPLAINER}/Predict", f"/{EXPLAINER}/ExplainStream",
                                         "/inference.GRPCInferenceService/ModelInfer", f"/{EXPLAINER}/Nope"]),
                        st.text(alphabet="abcXYZ./_-0", min_size=1, max_size=40).map(lambda t: "/" + t)),
       body=st.binary(max_size=4096), compressed=st.booleans(),
       header=st.sampled_from([(), (("authorization", "Bearer " + "x" * 40),), (("authorization", TOKEN),),
                               (("authorization", f"Basic {TOKEN}"),)]))
def test_any_rpc_without_a_valid_token_is_unauthenticated(token_server, method, body, compressed, header):
    """Known and unknown methods, of every kind, with any body: the same UNAUTHENTICATED."""
    with grpc.insecure_channel(token_server.address) as channel:
        call = channel.unary_unary(method)
        compression = grpc.Compression.Gzip if compressed else grpc.Compression.NoCompression
        assert _code(lambda: call(body, timeout=30, metadata=header, compression=compression)) == \
            grpc.StatusCode.UNAUTHENTICATED


def test_the_interceptors_keep_one_wrapper_per_handler_whatever_is_called(token_server):
    """An attacker's method names, with a token and without: the interceptors keep wrappers of the server's
    own handlers alone (each made once), not one per call or per name."""
    with grpc.insecure_channel(token_server.address) as channel:
        for i in range(200):
            call = channel.unary_unary(f"/attacker.Service/M{i}")
            token = (("authorization", f"Bearer {TOKEN}"),) if i % 2 else ()
            expected = grpc.StatusCode.UNIMPLEMENTED if token else grpc.StatusCode.UNAUTHENTICATED
            assert _code(lambda: call(b"", timeout=30, metadata=token)) == expected
    with ExplainerClient(token_server.address, token=TOKEN, timeout=30) as client:
        for _ in range(3):
            assert client.explain(X, model="mnist", heatmaps="none").components
            assert client.list_models().models
        with pytest.raises(ExplainerError):
            client._unary(client._stub.Explain, b"\xff\xfe")  # undecodable: the guard's answer
    drain, *_, guard = token_server.app.interceptors
    assert isinstance(guard, DecodeGuardInterceptor)
    assert len(guard.guarded) == 2  # Explain, ListModels
    assert len(drain.counted) == 3  # those two, and the refusal of a call without a token


def test_wrapped_handlers_are_bounded():
    kept = WrappedHandlers(limit=2)
    handlers = [grpc.unary_unary_rpc_method_handler(lambda request, context: request) for _ in range(3)]
    wrapped = [kept.get(id(h), h, lambda h: h._replace(request_deserializer=bytes)) for h in handlers]
    assert len(kept) == 2 and all(w.request_deserializer is bytes for w in wrapped)
    assert kept.get(id(handlers[0]), handlers[0], lambda h: None) is wrapped[0]  # kept: not wrapped again
    assert kept.get(id(handlers[2]), handlers[2], lambda h: h) is handlers[2]  # past the limit: wrapped anew


def test_token_files_are_checked(tmp_path):
    good = tmp_path / "good"
    good.write_text(f"# comment\n\n  {TOKEN}  \n{OTHER_TOKEN}\n")
    assert load_tokens(good) == [TOKEN.encode(), OTHER_TOKEN.encode()]
    for name, text in (("empty", "# nothing\n\n"), ("short", "abc\n"), ("spaced", "a token with spaces in it\n")):
        (tmp_path / name).write_text(text)
        with pytest.raises(SecurityConfigError):
            load_tokens(tmp_path / name)
    with pytest.raises(SecurityConfigError, match="cannot read"):
        load_tokens(tmp_path / "missing")


# ----------------------------------------------------------------------------- TLS

def test_a_plaintext_client_cannot_talk_to_the_tls_port(tls_server):
    with ExplainerClient(tls_server.address, token=TOKEN, timeout=30) as plaintext:
        assert _code(lambda: plaintext.list_models()) == grpc.StatusCode.UNAVAILABLE
    with grpc.insecure_channel(tls_server.address) as channel:
        check = health_pb2_grpc.HealthStub(channel).Check
        assert _code(lambda: check(health_pb2.HealthCheckRequest(), timeout=30)) == grpc.StatusCode.UNAVAILABLE


def test_a_client_that_does_not_trust_the_server_ca_fails(tls_server, pki):
    with ExplainerClient(tls_server.address, credentials=_credentials(pki, ca="rogue_ca"), token=TOKEN,
                         timeout=30) as client:
        assert _code(lambda: client.list_models()) == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_requires_a_client_certificate_from_the_ca(mtls_server, pki):
    with ExplainerClient(mtls_server.address, credentials=_credentials(pki, client="client"), timeout=30) as client:
        assert client.predict(X, model="mnist").prediction
    with ExplainerClient(mtls_server.address, credentials=_credentials(pki), timeout=30) as no_cert:
        assert _code(lambda: no_cert.list_models()) == grpc.StatusCode.UNAVAILABLE
    with ExplainerClient(mtls_server.address, credentials=_credentials(pki, client="rogue_client"),
                         timeout=30) as rogue:
        assert _code(lambda: rogue.list_models()) == grpc.StatusCode.UNAVAILABLE


def test_incomplete_tls_settings_are_refused(tmp_path, pki):
    """(Needs only files, but reuses the generated ones.)"""
    with pytest.raises(SecurityConfigError, match="both"):
        server_credentials(Settings(model_store=tmp_path, tls_cert=pki["server.crt"]))
    with pytest.raises(SecurityConfigError, match="needs"):
        server_credentials(Settings(model_store=tmp_path, tls_client_ca=pki["ca.crt"]))
    with pytest.raises(SecurityConfigError, match="cannot read"):
        server_credentials(Settings(model_store=tmp_path, tls_cert=tmp_path / "nope.crt", tls_key=pki["server.key"]))
    assert server_credentials(Settings(model_store=tmp_path)) is None


def test_serve_refuses_bad_security_settings_with_exit_code_2(tmp_path):
    (tmp_path / "server.key").write_text("not used")
    result = subprocess.run([Path(sys.executable).parent / "protoserve", "serve", "--model-store", tmp_path,
                             "--port", str(free_port()), "--metrics-port", "0", "--tls-key", tmp_path / "server.key"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "--tls-cert" in result.stderr
