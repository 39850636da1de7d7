-- POST one CloudEvent per request with a fresh id; the API key comes from the KEY variable.
-- Usage: KEY=... RUN=... wrk -s benchmarks/wrk/post.lua http://127.0.0.1:PORT/v1/events
local counter = 0
local run = os.getenv("RUN") or "wrk"
local key = os.getenv("KEY") or ""
local template = '{"specversion":"1.0","id":"%s-%d-%d","source":"bench/wrk","type":"api.request",'
  .. '"subject":"customer-%d","data":{"tokens":%d,"model":"m-small","region":"eu"}}'

function setup(thread)
  counter = counter + 1
  thread:set("tid", counter)
end

function init(_args)
  n = 0
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/cloudevents+json"
  if key ~= "" then wrk.headers["Authorization"] = "Bearer " .. key end
end

function request()
  n = n + 1
  return wrk.format(nil, nil, nil, string.format(template, run, tid, n, n % 500, 1 + n % 50))
end

function done(summary, latency, _requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests":%d,"duration_us":%d,"errors":%d,"non2xx":%d,"p50_us":%d,"p95_us":%d,"p99_us":%d}\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50), latency:percentile(95), latency:percentile(99)))
end
