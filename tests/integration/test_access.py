"""A closed management plane: Triton's restricted APIs and TLS (mutual too) on HTTP and gRPC,
driven by tritonclient with certificates made here."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from tritonclient.utils import InferenceServerException

from tests.conftest import InProcessServer, ServerProcess
from tests.integration.test_inference import simple_inputs

ADMIN = {"admin-key": "s3cret"}


def _certificate(
    name: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Certificate | None,
    issuer_key: ec.EllipticCurvePrivateKey | None,
    ca: bool,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return builder.sign(issuer_key or key, hashes.SHA256())


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files."""
    folder = tmp_path_factory.mktemp("certs")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _certificate("enginehouse test CA", ca_key, None, None, ca=True)
    files = {"ca": folder / "ca.pem"}
    files["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for role in ("server", "client"):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _certificate(f"enginehouse test {role}", key, ca, ca_key, ca=False)
        files[f"{role}_cert"] = folder / f"{role}.pem"
        files[f"{role}_key"] = folder / f"{role}.key"
        files[f"{role}_cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        files[f"{role}_key"].write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return files


@pytest.fixture(
    scope="module",
    params=[0, 2, "grpcio"],
    ids=["grpc-in-process", "grpc-workers", "grpcio-in-process"],
)
def restricted(
    request: pytest.FixtureRequest, example_repo: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[InProcessServer]:
    extra = (
        ["--grpc-frontend", "grpcio"]
        if request.param == "grpcio"
        else ["--grpc-workers", str(request.param)]
        if request.param
        else []
    )
    with InProcessServer.live(
        [example_repo],
        "--model-control-mode",
        "explicit",
        "--load-model",
        "simple",
        "--http-restricted-api",
        "model-repository,model-config:admin-key=s3cret",
        "--grpc-restricted-protocol",
        "model-repository:admin-key=s3cret",
        "--grpc-restricted-protocol",
        "statistics,model-config:admin-key=s3cret",
        *extra,
        log_path=tmp_path_factory.mktemp("log") / "restricted.log",
    ) as proc:
        yield proc


def _status(call, *args, **kwargs) -> str:  # type: ignore[no-untyped-def]
    try:
        call(*args, **kwargs)
    except InferenceServerException as exc:
        return str(exc.status())
    return "OK"


def test_restricted_apis_need_the_header(restricted: InProcessServer) -> None:
    http = httpclient.InferenceServerClient(restricted.http_url)
    grpc = grpcclient.InferenceServerClient(restricted.grpc_url)
    # Inference, health and metadata stay open.
    for client, module in ((http, httpclient), (grpc, grpcclient)):
        a, b, inputs = simple_inputs(module)
        np.testing.assert_array_equal(client.infer("simple", inputs).as_numpy("OUTPUT0"), a + b)
        assert client.is_server_ready()
        assert client.get_model_metadata("simple")
    # HTTP: repository and config need the header.
    assert _status(http.load_model, "identity_fp32") == "403"
    assert _status(http.get_model_config, "simple") == "403"
    assert _status(http.get_model_repository_index) == "403"
    assert _status(http.get_inference_statistics, "simple") == "OK"
    assert _status(http.load_model, "identity_fp32", headers=ADMIN) == "OK"
    assert _status(http.get_model_config, "simple", headers=ADMIN) == "OK"
    assert _status(http.load_model, "identity_fp32", headers={"admin-key": "wrong"}) == "403"
    # gRPC: repository, statistics and config need the header.
    denied = "StatusCode.PERMISSION_DENIED"
    assert _status(grpc.unload_model, "identity_fp32") == denied
    assert _status(grpc.get_inference_statistics, "simple") == denied
    assert _status(grpc.get_model_config, "simple") == denied
    assert _status(grpc.get_model_repository_index) == denied
    assert _status(grpc.get_inference_statistics, "simple", headers=ADMIN) == "OK"
    assert _status(grpc.unload_model, "identity_fp32", headers=ADMIN) == "OK"
    assert not http.is_model_ready("identity_fp32")
    assert "restricted" in _message(grpc.get_model_config, "simple")


def _message(call, *args) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(InferenceServerException) as info:
        call(*args)
    return str(info.value.message())


def test_bad_restriction_flags_stop_the_server_with_a_reason(example_repo: Path) -> None:
    for spec in ("nonsense", "bogus-api:key=value", "inference:key", "inference,inference:k=v"):
        server = ServerProcess([example_repo], "--http-restricted-api", spec)
        try:
            assert server.process.wait(timeout=60) != 0
        finally:
            server.stop()


def _http_tls_context(certs: dict[str, Path], client_cert: bool) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(certs["ca"]))
    if client_cert:
        context.load_cert_chain(str(certs["client_cert"]), str(certs["client_key"]))
    return context


@pytest.mark.parametrize(
    "workers",
    [0, 2, "grpcio", "native-workers"],
    ids=["grpc-in-process", "grpc-workers", "grpcio-in-process", "native-grpc-workers"],
)
@pytest.mark.parametrize("mutual", [False, True], ids=["tls", "mutual-tls"])
def test_tls_on_both_protocols(
    certs: dict[str, Path], example_repo: Path, tmp_path: Path, mutual: bool, workers: int | str
) -> None:
    flags: list[str] = []
    for protocol in ("http", "grpc"):
        flags += [
            f"--{protocol}-use-ssl-mutual" if mutual else f"--{protocol}-use-ssl",
            f"--{protocol}-server-cert",
            str(certs["server_cert"]),
            f"--{protocol}-server-key",
            str(certs["server_key"]),
            f"--{protocol}-root-cert",
            str(certs["ca"]),
        ]
    if workers == "grpcio":
        flags += ["--grpc-frontend", "grpcio"]
    elif workers == "native-workers":
        flags += ["--grpc-workers", "2", "--grpc-frontend", "native"]
    elif workers:
        flags += ["--grpc-workers", str(workers)]
    server = InProcessServer(
        [example_repo],
        *flags,
        log_path=tmp_path / "tls.log",
        https=_http_tls_context(certs, client_cert=mutual),
    )
    try:
        server.wait_live()
        root = str(certs["ca"])  # tritonclient takes the files' paths
        client_pair = (
            {
                "private_key": str(certs["client_key"]),
                "certificate_chain": str(certs["client_cert"]),
            }
            if mutual
            else {}
        )
        secure = grpcclient.InferenceServerClient(
            server.grpc_url, ssl=True, root_certificates=root, **client_pair
        )
        a, b, inputs = simple_inputs(grpcclient)
        np.testing.assert_array_equal(secure.infer("simple", inputs).as_numpy("OUTPUT0"), a + b)
        plain = grpcclient.InferenceServerClient(server.grpc_url)
        with pytest.raises(InferenceServerException):
            plain.is_server_live(client_timeout=5)
        if mutual:
            no_cert = grpcclient.InferenceServerClient(
                server.grpc_url, ssl=True, root_certificates=root
            )
            with pytest.raises(InferenceServerException):
                no_cert.is_server_live(client_timeout=5)

        https = httpclient.InferenceServerClient(
            server.http_url,
            ssl=True,
            ssl_context_factory=lambda: _http_tls_context(certs, client_cert=mutual),
        )
        a, b, inputs = simple_inputs(httpclient)
        np.testing.assert_array_equal(https.infer("simple", inputs).as_numpy("OUTPUT0"), a + b)
        plain_http = httpclient.InferenceServerClient(server.http_url, network_timeout=5)
        with pytest.raises(Exception):  # noqa: B017 - the TLS listener drops plain HTTP
            plain_http.is_server_live()
        if mutual:
            no_cert_http = httpclient.InferenceServerClient(
                server.http_url,
                ssl=True,
                ssl_context_factory=lambda: _http_tls_context(certs, client_cert=False),
                network_timeout=5,
            )
            with pytest.raises(Exception):  # noqa: B017 - the handshake fails without a cert
                no_cert_http.is_server_live()
    finally:
        server.stop()
