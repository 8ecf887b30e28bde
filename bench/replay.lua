-- wrk script: replays pre-built, pre-signed raw requests; thread k reads <prefix>.<k>.
-- Usage: wrk -t T -c C -d D -s bench/replay.lua http://host:port -- <prefix>
-- Prints one line `WRK_JSON {...}` with status counts and latency percentiles (microseconds).

local threads = {}
local next_id = 0

function setup(thread)
  thread:set("id", next_id)
  next_id = next_id + 1
  table.insert(threads, thread)
end

function init(args)
  local f = assert(io.open(args[1] .. "." .. id, "rb"))
  local data = f:read("*a")
  f:close()
  reqs = {}
  for rec in string.gmatch(data, "([^%z]+)") do
    reqs[#reqs + 1] = rec
  end
  idx = 0
  wrapped = 0
  acked = 0
  duplicate = 0
  other = 0
end

function request()
  idx = idx + 1
  if idx > #reqs then
    -- Out of unique deliveries: what follows are duplicates (200), not counted as acked.
    idx = 1
    wrapped = wrapped + 1
  end
  return reqs[idx]
end

function response(status, headers, body)
  if status == 202 then
    acked = acked + 1
  elseif status == 200 then
    duplicate = duplicate + 1
  else
    other = other + 1
  end
end

function done(summary, latency, requests)
  local a, d, o, w = 0, 0, 0, 0
  for _, t in ipairs(threads) do
    a = a + t:get("acked")
    d = d + t:get("duplicate")
    o = o + t:get("other")
    w = w + t:get("wrapped")
  end
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"duration_us":%d,"requests":%d,"acked":%d,"duplicate":%d,"other_status":%d,' ..
    '"wrapped":%d,"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency_us":{"p50":%d,"p90":%d,"p99":%d,"max":%d}}\n',
    summary.duration, summary.requests, a, d, o, w,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
