"""SMART on FHIR backend services with PyPI fhirclient, the SMART Python
client: a `client_credentials` token by an asymmetric client assertion
(private_key_jwt), then a search and a read. Run with the virtualenv of
e2e/venv.sh by e2e/src/idp.rs (`fhirclient_backend_services`):

  python smart_backend.py --base URL --client-id ID --key KEY.pem \
      --scope "system/Patient.rs" [--discovery URL] [--token-only]

Prints one JSON object; never the access token itself.

fhirclient 4.4.0 has half of backend services: its oauth2 auth sends
`grant_type=client_credentials` with `client_assertion_type` jwt-bearer and
the `jwt_token` it was given as `client_assertion`, and signs its requests
with the token. It does not make the assertion (no key handling, no JWT
library), and it finds the token endpoint only in the CapabilityStatement's
`oauth-uris` security extension (`metadata`), never in
`.well-known/smart-configuration`. So this script reads the discovery
document with requests, signs the assertion with PyJWT (pinned in
e2e/venv.sh), and hands both to fhirclient's own auth, which requests the
token and makes the FHIR requests.
"""

import argparse
import base64
import hashlib
import json
import sys
import time
import uuid

import jwt
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from fhirclient import client as fhir_client
from fhirclient.auth import FHIRAuth
from fhirclient.models.patient import Patient

parser = argparse.ArgumentParser()
parser.add_argument("--base", required=True, help="the FHIR base URL")
parser.add_argument("--client-id", required=True)
parser.add_argument("--key", required=True, help="the client's private key (PEM)")
parser.add_argument("--scope", required=True, help="space-separated SMART scopes")
parser.add_argument(
    "--discovery",
    help="a /.well-known/ document to read the token endpoint from, or the token endpoint "
    "(default: BASE/.well-known/smart-configuration)",
)
parser.add_argument("--token-only", action="store_true", help="stop after the token")
args = parser.parse_args()
base = args.base.rstrip("/")

# Discovery.
discovery = args.discovery or f"{base}/.well-known/smart-configuration"
if "/.well-known/" in discovery:
    answer = requests.get(discovery, headers={"Accept": "application/json"}, timeout=30)
    answer.raise_for_status()
    document = answer.json()
    token_endpoint = document["token_endpoint"]
    methods = document.get("token_endpoint_auth_methods_supported")
    if methods is not None and "private_key_jwt" not in methods:
        sys.exit(f"{discovery} does not offer private_key_jwt, only {methods}")
    grants = document.get("grant_types_supported")
    if grants is not None and "client_credentials" not in grants:
        sys.exit(f"{discovery} does not offer client_credentials, only {grants}")
else:
    token_endpoint = discovery

# The client assertion (RFC 7523, as SMART backend services ask).
with open(args.key, "rb") as f:
    key = serialization.load_pem_private_key(f.read(), password=None)
if isinstance(key, rsa.RSAPrivateKey):
    alg = "RS384"
    numbers = key.public_key().public_numbers()
    as_b64 = lambda i: base64.urlsafe_b64encode(i.to_bytes((i.bit_length() + 7) // 8, "big")).rstrip(b"=").decode()
    members = {"e": as_b64(numbers.e), "kty": "RSA", "n": as_b64(numbers.n)}
elif isinstance(key, ec.EllipticCurvePrivateKey):
    alg, crv, size = {"secp256r1": ("ES256", "P-256", 32), "secp384r1": ("ES384", "P-384", 48)}[key.curve.name]
    numbers = key.public_key().public_numbers()
    as_b64 = lambda i: base64.urlsafe_b64encode(i.to_bytes(size, "big")).rstrip(b"=").decode()
    members = {"crv": crv, "kty": "EC", "x": as_b64(numbers.x), "y": as_b64(numbers.y)}
else:
    sys.exit(f"{args.key}: neither an RSA nor an EC key")
# The kid the client's JWK was registered with: its RFC 7638 thumbprint.
canonical = json.dumps(members, separators=(",", ":"), sort_keys=True).encode()
kid = base64.urlsafe_b64encode(hashlib.sha256(canonical).digest()).rstrip(b"=").decode()
now = int(time.time())
assertion = jwt.encode(
    {
        "iss": args.client_id,
        "sub": args.client_id,
        "aud": token_endpoint,
        "iat": now,
        "exp": now + 300,
        "jti": uuid.uuid4().hex,
    },
    key,
    algorithm=alg,
    headers={"kid": kid, "typ": "JWT"},
)

# fhirclient: its oauth2 auth with the discovered token endpoint and the
# assertion; no launch, no patient context.
smart = fhir_client.FHIRClient(
    settings={"app_id": args.client_id, "api_base": base + "/", "scope": args.scope, "jwt_token": assertion}
)
smart.wants_patient = False
smart.server.auth = FHIRAuth.create(
    "oauth2", state={"app_id": args.client_id, "aud": base, "token_uri": token_endpoint, "jwt_token": assertion}
)
statuses = []
smart.server.session.hooks["response"].append(
    lambda r, *a, **k: statuses.append(
        (r.request.method, r.url, r.status_code, r.request.headers.get("Authorization", "").startswith("Bearer "))
    )
)
smart.authorize()
if not smart.ready:
    sys.exit("fhirclient has no access token after authorize()")

access_token = smart.server.auth.access_token
claims = jwt.decode(access_token, options={"verify_signature": False})
header = jwt.get_unverified_header(access_token)
result = {
    "token_endpoint": token_endpoint,
    "assertion_alg": alg,
    "scope": (smart.launch_context or {}).get("scope", claims.get("scope")),
    "token_type": (smart.launch_context or {}).get("token_type"),
    "expires_in": int(smart.server.auth.expires_at.timestamp() - time.time()) if smart.server.auth.expires_at else None,
    "jti": claims.get("jti"),
    "aud": claims.get("aud"),
    "client_id": claims.get("client_id"),
    "kid": header.get("kid"),
}

if not args.token_only:
    from fhirclient.models.fhirsearch import FHIRSearch

    bundle = FHIRSearch(Patient, struct={"_count": "1"}).perform(smart.server)
    entries = bundle.entry or []
    result["search"] = {
        "status": statuses[-1][2],
        "url": statuses[-1][1],
        "resource_type": bundle.resource_type,
        "resource_types": [e.resource.resource_type for e in entries if e.resource is not None],
        "total": bundle.total,
    }
    if entries and entries[0].resource is not None and entries[0].resource.id:
        patient = Patient.read(entries[0].resource.id, smart.server)
        result["read"] = {
            "status": statuses[-1][2],
            "url": statuses[-1][1],
            "resource_type": patient.resource_type,
            "id": patient.id,
        }

# Whether each request carried a bearer token (which one is not printed).
result["requests"] = [{"method": m, "url": u, "status": s, "bearer": b} for m, u, s, b in statuses]
print(json.dumps(result))
