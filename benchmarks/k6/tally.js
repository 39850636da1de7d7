// Load scenarios for Tally's gateway (and the bare ceilings), one per run, chosen by environment:
//   SCENARIO  single | batch | logs | webhook | retry | bare | usage (GET /v1/usage, KEY with usage:read)
//   MODE      rate (constant arrival rate: RATE requests/s) | max (VUS closed-loop users, highest rate)
//   URL, KEY (API key), RUN (unique id prefix), DURATION (e.g. 15s), BATCH (events per batch, 100),
//   WEBHOOK_SECRET (Stripe-style signing secret), P95_MS / P99_MS (thresholds), SUMMARY (JSON path).
// Log reads (KEY with logs:read) over seeded records from SINCE to UNTIL (epoch ms):
//   log_search  GET /v1/logs, one of SERVICES (comma-separated), a level and up, one hour
//   log_words   GET /v1/logs?q= one of SEARCHES ('|'-separated; 'word-{n}:B' takes n below B), 24 hours
//   log_stats   GET /v1/logs/stats per minute by BY (service,level unless given), one hour: CACHE=warm
//               asks for the same hour every time, CACHE=cold for an hour from a random millisecond (a miss)
// Every event id is unique per run, except the deliberate re-sends of the retry scenario.
import http from 'k6/http';
import crypto from 'k6/crypto';
import { check } from 'k6';
import { Counter } from 'k6/metrics';
import exec from 'k6/execution';

const E = __ENV;
const SCENARIO = E.SCENARIO || 'single';
const URL = E.URL || 'http://127.0.0.1:8080';
const RUN = E.RUN || 'k6';
const BATCH = parseInt(E.BATCH || '100', 10);
const DURATION = E.DURATION || '15s';
const RETRY_SHARE = parseFloat(E.RETRY_SHARE || '0.3');

const eventsAccepted = new Counter('events_accepted');
// Events accepted at least once: the retry scenario's re-sends of an accepted event are not added again.
const eventsAcceptedDistinct = new Counter('events_accepted_distinct');
const eventsSent = new Counter('events_sent');
const cacheHits = new Counter('cache_hits');
const cacheMisses = new Counter('cache_misses');

const load = E.MODE === 'max'
  ? { executor: 'constant-vus', vus: parseInt(E.VUS || '32', 10), duration: DURATION }
  : {
      executor: 'constant-arrival-rate',
      rate: parseInt(E.RATE || '500', 10),
      timeUnit: '1s',
      duration: DURATION,
      preAllocatedVUs: parseInt(E.VUS || '64', 10),
      maxVUs: parseInt(E.MAX_VUS || '256', 10),
    };

export const options = {
  scenarios: { [SCENARIO]: load },
  discardResponseBodies: ['single', 'bare', 'usage', 'log_search', 'log_words', 'log_stats'].includes(SCENARIO),
  summaryTrendStats: ['avg', 'min', 'med', 'p(90)', 'p(95)', 'p(99)', 'max'],
  thresholds: {
    http_req_failed: ['rate<0.01'],
    http_req_duration: [`p(95)<${E.P95_MS || 25}`, `p(99)<${E.P99_MS || 50}`],
  },
  noConnectionReuse: false,
};

const BEARER = { Authorization: `Bearer ${E.KEY || ''}` };

function eventId(n) {
  return `${RUN}-${SCENARIO}-${exec.vu.idInTest}-${exec.vu.iterationInScenario}-${n}`;
}

function event(id, n) {
  return {
    specversion: '1.0',
    id,
    source: `bench/${SCENARIO}`,
    type: 'api.request',
    subject: `customer-${(exec.vu.idInTest * 31 + n) % 500}`,
    time: new Date().toISOString(),
    data: { tokens: 1 + (n % 50), model: 'm-small', region: 'eu' },
  };
}

function logRecord(n) {
  return {
    service: `svc-${n % 8}`,
    level: ['info', 'warn', 'error'][n % 3],
    message: `request handled in ${n % 97} ms`,
    time: new Date().toISOString(),
    attributes: { route: '/v1/things', status: 200 },
    id: eventId(n),
    trace_id: crypto.md5(eventId(n), 'hex'),
  };
}

// Text of a batch of event() objects cut at each id's per-iteration prefix and at each time.
let template = null;
function batchTemplate() {
  if (template === null) {
    const ID = '\u0001', TIME = '\u0002';
    const events = [];
    for (let i = 0; i < BATCH; i++) events.push({ ...event(`${ID}${i}`, i), time: TIME });
    template = JSON.stringify(events).split(/\\u0001|\\u0002/);
  }
  return template;
}

// The number of events a 2xx answer accepted: per-item results when the route gives them.
function accepted(res, sent) {
  if (res.status < 200 || res.status >= 300) return 0;
  if (!res.body || sent === 1) return sent;
  const counted = /^\{"accepted":(\d+),/.exec(res.body);
  if (counted) return parseInt(counted[1], 10);
  try {
    const body = res.json();
    if (typeof body.accepted === 'number') return body.accepted;
    const items = Array.isArray(body) ? body : body.results || body.items;
    if (Array.isArray(items)) return items.filter((r) => (r.status || 'accepted') === 'accepted' || r.status === 202).length;
  } catch (_e) { /* not JSON: count the whole request */ }
  return sent;
}

function send(path, body, headers, sent) {
  const res = http.post(`${URL}${path}`, body, { headers, tags: { name: path } });
  check(res, { '2xx': (r) => r.status >= 200 && r.status < 300 });
  eventsSent.add(sent);
  const n = accepted(res, sent);
  eventsAccepted.add(n);
  return n;
}

function post(path, body, headers, sent) {
  eventsAcceptedDistinct.add(send(path, body, headers, sent));
}

function stripeSignature(payload) {
  const t = Math.floor(Date.now() / 1000);
  const v1 = crypto.hmac('sha256', E.WEBHOOK_SECRET || 'whsec_bench', `${t}.${payload}`, 'hex');
  return `t=${t},v1=${v1}`;
}

const SINCE = parseInt(E.SINCE || '0', 10);
const UNTIL = parseInt(E.UNTIL || '0', 10);
const HOUR = 3600 * 1000;
const SERVICES = (E.SERVICES || 'checkout-api').split(',');
const SEARCHES = (E.SEARCHES || 'shipped').split('|');
const LEVELS = ['debug', 'info', 'warn', 'error'];

function any(list) {
  return list[Math.floor(Math.random() * list.length)];
}

// [start, end) of `hours` ending at a random moment in the seeded range, as query parameters.
function range(hours) {
  const end = SINCE + hours * HOUR + Math.floor(Math.random() * (UNTIL - SINCE - hours * HOUR));
  return `start=${new Date(end - hours * HOUR).toISOString()}&end=${new Date(end).toISOString()}`;
}

function words() {
  const [text, bound] = any(SEARCHES).split(':');
  return encodeURIComponent(text.replace('{n}', Math.floor(Math.random() * parseInt(bound || '1', 10))));
}

function read(path, name) {
  const res = http.get(`${URL}${path}`, { headers: BEARER, tags: { name } });
  check(res, { '200': (r) => r.status === 200 });
  return res;
}

const scenarios = {
  bare: () => post('/v1/events', JSON.stringify(event(eventId(0), 0)), { 'Content-Type': 'application/json' }, 1),
  single: () => post('/v1/events', JSON.stringify(event(eventId(0), 0)),
    { ...BEARER, 'Content-Type': 'application/cloudevents+json' }, 1),
  // The same events as event() builds, spliced into text made once per VU: JSON.stringify of 100
  // objects per request kept k6 busier than the gateway, so the load generator set the rate.
  batch: () => {
    const parts = batchTemplate();
    const prefix = eventId('');
    const now = new Date().toISOString();
    const body = [parts[0]];
    for (let i = 0; i < BATCH; i++) body.push(prefix, parts[2 * i + 1], now, parts[2 * i + 2]);
    post('/v1/events/batch', body.join(''), { ...BEARER, 'Content-Type': 'application/cloudevents-batch+json' }, BATCH);
  },
  logs: () => {
    const records = [];
    for (let i = 0; i < BATCH; i++) records.push(logRecord(i));
    post('/v1/logs', JSON.stringify(records), { ...BEARER, 'Content-Type': 'application/json' }, BATCH);
  },
  webhook: () => {
    const id = `evt_${eventId(0)}`;
    const payload = JSON.stringify({ id, object: 'event', type: 'invoice.paid', created: Math.floor(Date.now() / 1000),
      data: { object: { id: `in_${id}`, amount_paid: 1200, customer: `cus_${exec.vu.idInTest % 50}` } } });
    post(`/v1/webhooks/${E.WEBHOOK_SOURCE || 'stripe'}`, payload,
      { 'Content-Type': 'application/json', 'Stripe-Signature': stripeSignature(payload) }, 1);
  },
  usage: () => read(`/v1/usage?subject=customer-${(exec.vu.idInTest * 31 + exec.vu.iterationInScenario) % 500}`,
    '/v1/usage'),
  log_search: () => read(`/v1/logs?service=${any(SERVICES)}&level=${any(LEVELS)}&${range(1)}`, '/v1/logs'),
  log_words: () => read(`/v1/logs?q=${words()}&${range(24)}`, '/v1/logs?q'),
  log_stats: () => {
    const hour = E.CACHE === 'warm'
      ? `start=${new Date(UNTIL - HOUR).toISOString()}&end=${new Date(UNTIL).toISOString()}` : range(1);
    const res = read(`/v1/logs/stats?by=${E.BY || 'service,level'}&${hour}`, '/v1/logs/stats');
    (res.headers['X-Tally-Cache'] === 'hit' ? cacheHits : cacheMisses).add(1);
  },
  // A share of requests re-sent once or twice with the same ids, as producers do after a timeout.
  // BATCH=1 sends single events to /v1/events instead of batches.
  retry: () => {
    const events = [];
    for (let i = 0; i < BATCH; i++) events.push(event(eventId(i), i));
    const single = BATCH === 1;
    const body = JSON.stringify(single ? events[0] : events);
    const headers = { ...BEARER, 'Content-Type': single ? 'application/cloudevents+json' : 'application/cloudevents-batch+json' };
    const sends = Math.random() < RETRY_SHARE ? 2 + Math.floor(Math.random() * 2) : 1;
    // the send that accepted most: exact unless two sends of one batch accepted different parts of it
    let most = 0;
    for (let s = 0; s < sends; s++) most = Math.max(most, send(single ? '/v1/events' : '/v1/events/batch', body, headers, BATCH));
    eventsAcceptedDistinct.add(most);
  },
};

export default scenarios[SCENARIO];

export function handleSummary(data) {
  const d = data.metrics.http_req_duration.values;
  const line = `${SCENARIO}: ${data.metrics.http_reqs.values.rate.toFixed(0)} req/s, ` +
    `p50 ${d.med.toFixed(1)} ms, p99 ${d['p(99)'].toFixed(1)} ms, ` +
    `failed ${(100 * data.metrics.http_req_failed.values.rate).toFixed(2)}%\n`;
  return { [E.SUMMARY || 'summary.json']: JSON.stringify(data), stdout: line };
}
