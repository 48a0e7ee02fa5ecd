// The tests' OpenID provider: oidc-provider (installed by e2e/idp.sh) issuing
// SMART backend services access tokens (client_credentials, clients
// authenticated by private_key_jwt, JWT access tokens whose `aud` is the
// resource, e.g. a FHIR base URL), served over HTTPS by node's own server.
//
//   node provider.mjs CONFIG.json
//
// CONFIG.json (written by e2e/src/idp.rs):
//   node_modules      where e2e/idp.sh installed oidc-provider
//   port, cert, key   HTTPS on 127.0.0.1:port; the issuer is https://127.0.0.1:port
//   keystore          the signing keys (a private JWKS), created when missing;
//                     the first key signs, every key is published
//   signing_alg       RS256 or ES256
//   admin_token       the bearer token of the /_admin/ endpoints
//   default_resource  the audience of tokens requested without `resource`
//   access_token_ttl  seconds
//   clients           [{client_id, scopes: [...], jwks: {keys: [...]}, auth_alg}]
//
// Administration, with `Authorization: Bearer <admin_token>`:
//   POST /_admin/rotate  a new signing key goes first in the keystore (the
//                        old ones stay published); answers {"kid": ...}
//   POST /_admin/reload  reads CONFIG.json again (clients, default resource)
// Either builds a new provider; requests after the answer use it.
import { createHash, generateKeyPairSync, timingSafeEqual } from 'node:crypto';
import { existsSync, readFileSync, renameSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:https';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';

const configFile = process.argv[2];
if (!configFile) {
  console.error('usage: node provider.mjs CONFIG.json');
  process.exit(2);
}
const readConfig = () => JSON.parse(readFileSync(configFile, 'utf8'));
let config = readConfig();

const packageDir = join(config.node_modules, 'oidc-provider');
const { main } = JSON.parse(readFileSync(join(packageDir, 'package.json'), 'utf8'));
const { default: Provider } = await import(pathToFileURL(join(packageDir, main)).href);

const issuer = `https://127.0.0.1:${config.port}`;

const b64url = (buffer) => buffer.toString('base64url');

// RFC 7638 thumbprint of the public key: the kid.
function thumbprint(jwk) {
  const members = jwk.kty === 'RSA' ? { e: jwk.e, kty: jwk.kty, n: jwk.n } : { crv: jwk.crv, kty: jwk.kty, x: jwk.x, y: jwk.y };
  return b64url(createHash('sha256').update(JSON.stringify(members)).digest());
}

function newSigningKey(alg) {
  const { privateKey } = alg.startsWith('ES')
    ? generateKeyPairSync('ec', { namedCurve: { ES256: 'P-256', ES384: 'P-384', ES512: 'P-521' }[alg] })
    : generateKeyPairSync('rsa', { modulusLength: 2048 });
  const jwk = privateKey.export({ format: 'jwk' });
  return { ...jwk, kid: thumbprint(jwk), alg, use: 'sig' };
}

function writeKeystore(keys) {
  const partial = `${config.keystore}.partial`;
  writeFileSync(partial, JSON.stringify({ keys }, null, 2), { mode: 0o600 });
  renameSync(partial, config.keystore);
}

function readKeystore() {
  if (!existsSync(config.keystore)) {
    writeKeystore([newSigningKey(config.signing_alg)]);
  }
  return JSON.parse(readFileSync(config.keystore, 'utf8')).keys;
}

function build() {
  const keys = readKeystore();
  const alg = config.signing_alg;
  const clientScopes = new Map(config.clients.map((c) => [c.client_id, c.scopes]));
  const allScopes = new Set(config.clients.flatMap((c) => c.scopes));
  const provider = new Provider(issuer, {
    clients: config.clients.map((c) => ({
      client_id: c.client_id,
      grant_types: ['client_credentials'],
      response_types: [],
      redirect_uris: [],
      token_endpoint_auth_method: 'private_key_jwt',
      token_endpoint_auth_signing_alg: c.auth_alg,
      // No ID tokens here, but the metadata must name a key the provider has.
      id_token_signed_response_alg: alg,
      jwks: c.jwks,
      scope: c.scopes.join(' '),
    })),
    jwks: { keys },
    // Every client's scopes are known: asking for one that is not the
    // client's own is refused (invalid_scope), not silently dropped.
    scopes: ['openid', ...allScopes],
    clientAuthMethods: ['private_key_jwt'],
    enabledJWA: {
      clientAuthSigningAlgValues: ['RS256', 'RS384', 'RS512', 'PS256', 'PS384', 'PS512', 'ES256', 'ES384', 'ES512'],
    },
    features: {
      devInteractions: { enabled: false },
      clientCredentials: { enabled: true },
      introspection: { enabled: false },
      revocation: { enabled: false },
      resourceIndicators: {
        enabled: true,
        defaultResource: async (_ctx, _client, oneOf) => oneOf ?? config.default_resource ?? undefined,
        useGrantedResource: async () => true,
        getResourceServerInfo: async (_ctx, resourceIndicator, client) => ({
          // The scopes this client may have at any resource.
          scope: (clientScopes.get(client.clientId) ?? []).join(' '),
          audience: resourceIndicator,
          accessTokenTTL: config.access_token_ttl,
          accessTokenFormat: 'jwt',
          jwt: { sign: { alg } },
        }),
      },
    },
    ttl: { ClientCredentials: config.access_token_ttl },
    cookies: { keys: [b64url(createHash('sha256').update(config.admin_token).digest())] },
  });
  provider.on('server_error', (_ctx, error) => console.error('idp: server_error', error));
  provider.on('grant.error', (_ctx, error) => console.error('idp: token request refused:', error.message, error.error_description ?? ''));
  return { provider, callback: provider.callback(), kid: keys[0].kid };
}

let current = build();

function admitted(req) {
  const given = Buffer.from(req.headers.authorization ?? '');
  const expected = Buffer.from(`Bearer ${config.admin_token}`);
  return given.length === expected.length && timingSafeEqual(given, expected);
}

function answer(res, status, body) {
  res.writeHead(status, { 'content-type': 'application/json' });
  res.end(JSON.stringify(body));
}

function admin(req, res) {
  if (!admitted(req)) return answer(res, 401, { error: 'admin token required' });
  if (req.method !== 'POST') return answer(res, 405, { error: 'POST only' });
  try {
    if (req.url === '/_admin/rotate') {
      writeKeystore([newSigningKey(config.signing_alg), ...readKeystore()]);
    } else if (req.url === '/_admin/reload') {
      config = { ...readConfig(), port: config.port };
    } else {
      return answer(res, 404, { error: `no admin endpoint ${req.url}` });
    }
    current = build();
    console.error(`idp: ${req.url}: signing with kid ${current.kid}`);
    return answer(res, 200, { kid: current.kid });
  } catch (error) {
    console.error('idp: admin request failed', error);
    return answer(res, 500, { error: String(error) });
  }
}

const server = createServer({ cert: readFileSync(config.cert), key: readFileSync(config.key) }, (req, res) => {
  if (req.url.startsWith('/_admin/')) return admin(req, res);
  return current.callback(req, res);
});
server.listen(config.port, '127.0.0.1', () => {
  console.error(`idp: ${issuer} signing with kid ${current.kid}`);
});
for (const signal of ['SIGTERM', 'SIGINT']) {
  process.on(signal, () => process.exit(0));
}
