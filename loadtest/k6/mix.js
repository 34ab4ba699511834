// A realistic mix through keyward, 30 s on loopback (run by loadtest/k6.sh, which starts keyward
// and the upstream and passes the keys in the environment):
//   - two chat agents (role chat) making small POSTs at 100 req/s between them, never throttled;
//   - one of them also opening SSE streams (20 events over 0.5 s) at 4 streams/s;
//   - a reader agent (role reader) making GETs on another route at 50 req/s;
//   - a batch agent (role batch, quota 5/s with burst 5) calling at 25 req/s, so most of its
//     calls must be throttled with 429;
//   - at 15 s, a rotation of OPENAI_KEY through the admin API (POST /admin/secrets/{name}/rotate
//     with the admin bearer token); k6.sh writes the new value to the secrets file just before,
//     so the rotation promotes it while the other agents keep calling.
// Thresholds (k6 exits non-zero when one fails):
//   - error rate under 1% for every agent that is not over its quota, rotation included;
//   - p95 under 50 ms for small calls, under 1,500 ms for whole 0.5 s streams;
//   - the throttled agent gets 429 for more than half of its calls, and nobody else ever gets a 429;
//   - the rotation promoted the new value (rotated == 1) and no call failed because of it.
import http from 'k6/http';
import { check } from 'k6';
import { Counter, Rate } from 'k6/metrics';

const PROXY = __ENV.PROXY || 'http://127.0.0.1:19080';
const ADMIN = __ENV.ADMIN || 'http://127.0.0.1:19090';
const unexpected429 = new Counter('unexpected_429');
const throttled429 = new Rate('throttled_429');
const rotated = new Counter('rotated');

const rate = (exec, perSecond, extra = {}) => ({
  executor: 'constant-arrival-rate', exec, rate: perSecond, timeUnit: '1s', duration: '30s',
  preAllocatedVUs: 20, maxVUs: 100, gracefulStop: '5s', ...extra,
});

export const options = {
  scenarios: {
    chat: rate('chat', 100),
    stream: rate('stream', 4),
    reader: rate('reader', 50),
    batch: rate('batch', 25),
    rotate: { executor: 'shared-iterations', exec: 'rotate', vus: 1, iterations: 1, startTime: '15s', maxDuration: '10s' },
  },
  thresholds: {
    'http_req_failed{class:normal}': ['rate<0.01'],
    'http_req_duration{kind:small}': ['p(95)<50'],
    'http_req_duration{kind:stream}': ['p(95)<1500'],
    unexpected_429: ['count==0'],
    throttled_429: ['rate>0.5'],
    checks: ['rate>0.99'],
    rotated: ['count==1'],
  },
};

const auth = (key) => ({ Authorization: `Bearer ${key}` });

function normal(response, what) {
  if (response.status === 429) unexpected429.add(1, { scenario: what });
  return check(response, { [`${what}: 200`]: (r) => r.status === 200 });
}

export function chat() {
  const key = __ITER % 2 === 0 ? __ENV.CHAT1_KEY : __ENV.CHAT2_KEY;
  const body = JSON.stringify({ model: 'bench', messages: [{ role: 'user', content: 'hello' }] });
  const r = http.post(`${PROXY}/llm/v1/chat/json1k`, body, {
    headers: { ...auth(key), 'Content-Type': 'application/json' }, tags: { class: 'normal', kind: 'small' },
  });
  normal(r, 'chat');
}

export function stream() {
  const r = http.get(`${PROXY}/llm/v1/sse?events=20&interval_ms=25`, {
    headers: { ...auth(__ENV.CHAT2_KEY), Accept: 'text/event-stream' }, tags: { class: 'normal', kind: 'stream' },
  });
  normal(r, 'stream');
  check(r, { 'stream: 20 events': (res) => (res.body || '').split('data:').length - 1 === 20 });
}

export function reader() {
  const r = http.get(`${PROXY}/gh/repos/o/r/json1k`, {
    headers: auth(__ENV.READER_KEY), tags: { class: 'normal', kind: 'small' },
  });
  normal(r, 'reader');
}

export function batch() {
  const r = http.post(`${PROXY}/llm/v1/batch/json1k`, '{}', {
    headers: { ...auth(__ENV.BATCH_KEY), 'Content-Type': 'application/json' },
    tags: { class: 'throttled', kind: 'small' },
    responseCallback: http.expectedStatuses(200, 429),
  });
  throttled429.add(r.status === 429);
  check(r, { 'batch: 200 or 429': (res) => res.status === 200 || res.status === 429 });
}

export function rotate() {
  const r = http.post(`${ADMIN}/admin/secrets/OPENAI_KEY/rotate`, null, {
    headers: auth(__ENV.ADMIN_TOKEN), tags: { class: 'admin' },
    responseCallback: http.expectedStatuses(200),
  });
  const promoted = r.status === 200 && r.json('rotation.outcome') === 'promoted';
  if (promoted) rotated.add(1);
  check(r, { 'rotate: the new value was promoted': () => promoted });
}
