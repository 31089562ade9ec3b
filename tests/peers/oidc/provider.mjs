// A real OpenID provider for idgate's integration tests: the certified
// `oidc-provider` package, configured for one public client that signs a human
// in with the authorization code flow and PKCE through the provider's own
// development login pages (any login name, any password).
//
//   node provider.mjs PORT
//
// Listens on 127.0.0.1:PORT with issuer http://127.0.0.1:PORT, prints one JSON
// line `{"issuer": ...}` on stdout once it accepts connections, and exits when
// its standard input closes (so it never outlives the test that started it) or
// on SIGTERM.
//
// Resource indicators (RFC 8707) make the access tokens JWTs (RFC 9068) with
// the resource as `aud`:
//   https://idgate.test  the gateway: scopes `chat models:read`
//   https://other.test   another API: scope `chat` (a token idgate must refuse)
// The RSA signing key is made at start and lives only in this process.

import { generateKeyPairSync, randomBytes } from 'node:crypto';
import Provider, { errors } from 'oidc-provider';

const port = Number.parseInt(process.argv[2] ?? '', 10);
if (!Number.isInteger(port) || port <= 0) {
  process.stderr.write('usage: node provider.mjs PORT\n');
  process.exit(2);
}
const issuer = `http://127.0.0.1:${port}`;

const RESOURCE_SERVERS = {
  'https://idgate.test': 'chat models:read',
  'https://other.test': 'chat',
};

const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
const signingKey = { ...privateKey.export({ format: 'jwk' }), kid: 'test-rsa-1', alg: 'RS256', use: 'sig' };

const provider = new Provider(issuer, {
  clients: [
    {
      client_id: 'chat-app',
      client_name: 'Chat app (public client)',
      application_type: 'native',
      token_endpoint_auth_method: 'none',
      grant_types: ['authorization_code'],
      response_types: ['code'],
      redirect_uris: ['http://127.0.0.1/callback'],
    },
  ],
  jwks: { keys: [signingKey] },
  cookies: { keys: [randomBytes(32).toString('hex')] },
  scopes: ['openid', 'profile', 'email'],
  claims: { openid: ['sub'], email: ['email'], profile: ['name'] },
  findAccount: async (ctx, sub) => ({
    accountId: sub,
    claims: async () => ({ sub, name: sub, email: `${sub}@example.test` }),
  }),
  ttl: { AccessToken: 300, AuthorizationCode: 60, IdToken: 300, Interaction: 300, Session: 600, Grant: 600 },
  features: {
    devInteractions: { enabled: true },
    resourceIndicators: {
      enabled: true,
      useGrantedResource: () => true,
      getResourceServerInfo: (ctx, resource) => {
        const scope = RESOURCE_SERVERS[resource];
        if (scope === undefined) {
          throw new errors.InvalidTarget(`unknown resource ${resource}`);
        }
        return {
          scope,
          audience: resource,
          accessTokenTTL: 300,
          accessTokenFormat: 'jwt',
          jwt: { sign: { alg: 'RS256' } },
        };
      },
    },
  },
});

const server = provider.listen(port, '127.0.0.1', () => {
  process.stdout.write(`${JSON.stringify({ issuer })}\n`);
});

function stop() {
  server.close();
  process.exit(0);
}
process.on('SIGTERM', stop);
process.stdin.on('end', stop);
process.stdin.resume();
