"""HTTPS: `gqa-serve serve` with a certificate (and with client certificates required), and the settings'
errors, each one line naming the setting before the model loads. Certificates come from trustme's test CA."""
from __future__ import annotations

import socket
import ssl
import subprocess
import sys
import time

import httpx
import pytest
import trustme

from server.config import ConfigError, ServerConfig, load_config
from server.serve import tls_error
from tests.test_server_e2e import REPO, free_port


@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


@pytest.fixture(scope="module")
def server_files(ca, tmp_path_factory):
    """PEM files of a certificate for 127.0.0.1 and its key, and the CA's certificate."""
    folder = tmp_path_factory.mktemp("tls")
    cert = ca.issue_cert("127.0.0.1")
    paths = {"cert": folder / "cert.pem", "key": folder / "key.pem", "ca": folder / "ca.pem"}
    cert.cert_chain_pems[0].write_to_path(str(paths["cert"]))
    cert.private_key_pem.write_to_path(str(paths["key"]))
    ca.cert_pem.write_to_path(str(paths["ca"]))
    return paths


def serve_https(model_dir, *flags: str) -> tuple[subprocess.Popen, str]:
    """`gqa-serve serve` with TLS flags, once it listens (an HTTPS port answers a TLS handshake)."""
    port = free_port()
    cmd = [sys.executable, "-m", "server.cli", "serve", "--model", str(model_dir), "--device", "cpu",
           "--dtype", "float32", "--port", str(port), "--kv-cache-memory", "8MiB", *flags]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 90
    while proc.poll() is None and time.monotonic() < deadline:
        try:  # a TCP connection only: a TLS probe without the client certificate would be refused under mTLS
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, f"https://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise AssertionError(proc.stdout.read())


def wait_ready(url: str, **client) -> httpx.Response:
    deadline = time.monotonic() + 90
    while True:
        r = httpx.get(url + "/health", **client)
        if r.status_code == 200 or time.monotonic() > deadline:
            return r
        time.sleep(0.1)


def stop(proc: subprocess.Popen) -> str:
    proc.kill()
    return proc.communicate()[0]


def test_https_serves_generation_and_plain_http_gets_no_answer(tiny_llama_dir, server_files):
    proc, url = serve_https(tiny_llama_dir, "--ssl-certfile", str(server_files["cert"]),
                            "--ssl-keyfile", str(server_files["key"]))
    try:
        trusted = ssl.create_default_context(cafile=str(server_files["ca"]))
        assert wait_ready(url, verify=trusted).status_code == 200
        r = httpx.post(url + "/generate", json={"inputs": "ROMEO:", "parameters": {"max_new_tokens": 4}},
                       verify=trusted, timeout=60)
        assert r.status_code == 200 and r.json()["generated_text"]
        with pytest.raises(httpx.ConnectError):  # our CA, not the system's: an unknown certificate
            httpx.get(url + "/health")
        with pytest.raises(httpx.TransportError):  # plain HTTP to the HTTPS port
            httpx.get(url.replace("https://", "http://") + "/health")
    finally:
        log = stop(proc)
    assert "listening on https://127.0.0.1" in log


def test_mutual_tls_refuses_clients_without_a_certificate(tiny_llama_dir, server_files, ca, tmp_path):
    proc, url = serve_https(tiny_llama_dir, "--ssl-certfile", str(server_files["cert"]),
                            "--ssl-keyfile", str(server_files["key"]), "--ssl-ca-certs", str(server_files["ca"]))
    try:
        with_cert = ssl.create_default_context(cafile=str(server_files["ca"]))
        ca.issue_cert("client@example.org").configure_cert(with_cert)
        assert wait_ready(url, verify=with_cert).status_code == 200
        without = ssl.create_default_context(cafile=str(server_files["ca"]))
        with pytest.raises(httpx.TransportError):
            httpx.get(url + "/health", verify=without)
        stranger = ssl.create_default_context(cafile=str(server_files["ca"]))
        trustme.CA().issue_cert("client@example.org").configure_cert(stranger)  # another CA's certificate
        with pytest.raises(httpx.TransportError):
            httpx.get(url + "/health", verify=stranger)
    finally:
        stop(proc)


@pytest.mark.parametrize("given, named", [({"ssl_certfile": "c.pem"}, "ssl_keyfile"),
                                          ({"ssl_keyfile": "k.pem"}, "ssl_certfile"),
                                          ({"ssl_ca_certs": "ca.pem"}, "ssl_ca_certs")])
def test_tls_settings_that_come_together_are_named(given, named):
    with pytest.raises(ConfigError, match=f"^server: {named}: "):
        load_config(given, environ={})


def test_unusable_tls_files_are_one_line_naming_the_setting(server_files, tmp_path, ca):
    good = dict(ssl_certfile=str(server_files["cert"]), ssl_keyfile=str(server_files["key"]))
    assert tls_error(ServerConfig(**good)) is None
    assert tls_error(ServerConfig(**good, ssl_ca_certs=str(server_files["ca"]))) is None
    missing = str(tmp_path / "nope.pem")
    assert tls_error(ServerConfig(**{**good, "ssl_keyfile": missing})) == \
        f"server.ssl_keyfile: no such file {missing!r}"
    other_key = tmp_path / "other.pem"
    ca.issue_cert("127.0.0.1").private_key_pem.write_to_path(str(other_key))
    mismatch = tls_error(ServerConfig(**{**good, "ssl_keyfile": str(other_key)}))
    assert mismatch.startswith("server.ssl_certfile: cannot load the certificate and ssl_keyfile's key")
    not_a_ca = tmp_path / "text.pem"
    not_a_ca.write_text("not a certificate")
    assert tls_error(ServerConfig(**good, ssl_ca_certs=str(not_a_ca))).startswith("server.ssl_ca_certs: ")


def test_the_cli_refuses_a_bad_tls_file_before_loading_the_model(tiny_llama_dir, server_files, tmp_path):
    missing = str(tmp_path / "nope.pem")
    done = subprocess.run([sys.executable, "-m", "server.cli", "serve", "--model", str(tiny_llama_dir),
                           "--port", str(free_port()), "--ssl-certfile", str(server_files["cert"]),
                           "--ssl-keyfile", missing], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip() == f"gqa-serve serve: server.ssl_keyfile: no such file {missing!r}"


def test_an_encrypted_key_takes_its_password_and_never_prompts(server_files, tmp_path):
    """Without a password, loading an encrypted key asked for one on the terminal ("Enter PEM pass phrase:"),
    which blocks a server started from a shell."""
    from cryptography.hazmat.primitives import serialization
    key = serialization.load_pem_private_key(server_files["key"].read_bytes(), None)
    encrypted = tmp_path / "encrypted.pem"
    encrypted.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.BestAvailableEncryption(b"s3cret")))
    files = dict(ssl_certfile=str(server_files["cert"]), ssl_keyfile=str(encrypted))
    assert tls_error(ServerConfig(**files, ssl_keyfile_password="s3cret")) is None
    assert tls_error(ServerConfig(**files)) == "server.ssl_keyfile_password: ssl_keyfile is encrypted; give its password"
    wrong = tls_error(ServerConfig(**files, ssl_keyfile_password="nope"))
    assert wrong.startswith("server.ssl_keyfile_password: cannot decrypt ssl_keyfile with it"), wrong
