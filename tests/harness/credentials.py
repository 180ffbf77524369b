"""A C2PA signing chain for tests, made with `cryptography` as a CA would issue one: a CA
(basicConstraints CA, keyCertSign) and a P-256 leaf (digitalSignature, emailProtection, key
identifiers), the leaf first in the PEM chain. It validates, with `signingCredential.untrusted`
(its CA is in no trust list)."""

from __future__ import annotations

import datetime as dt

CERT_ENV, KEY_ENV = "IFRENDER_TEST_C2PA_CERT", "IFRENDER_TEST_C2PA_KEY"


def _name(cn: str):
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, cn), x509.NameAttribute(NameOID.ORGANIZATION_NAME, "ifrender tests")]
    )


def _usage(**on):
    from cryptography import x509

    names = ("digital_signature", "content_commitment", "key_encipherment", "data_encipherment", "key_agreement",
             "key_cert_sign", "crl_sign", "encipher_only", "decipher_only")  # fmt: skip
    return x509.KeyUsage(**{n: on.get(n, False) for n in names})


def signing_chain() -> tuple[bytes, bytes]:
    """(the certificate chain, PEM, leaf first; the leaf's PKCS#8 private key, PEM)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID

    now = dt.datetime.now(dt.UTC)

    def cert(subject, issuer, public, signer, ca: bool):
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .add_extension(
                _usage(key_cert_sign=True, crl_sign=True) if ca else _usage(digital_signature=True), critical=True
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        )
        if not ca:
            builder = builder.add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False
            )
            builder = builder.add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()), critical=False
            )
        return builder.sign(signer, hashes.SHA256())

    key = ec.generate_private_key(ec.SECP256R1())
    pem = serialization.Encoding.PEM
    private = key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = cert(_name("test CA"), _name("test CA"), ca_key.public_key(), ca_key, ca=True)
    leaf = cert(_name("ifrender test signer"), ca.subject, key.public_key(), ca_key, ca=False)
    return leaf.public_bytes(pem) + ca.public_bytes(pem), private
