-- wrk script for `make soak` (handler/soak.py): POST real digit PNGs, and every BAD_EVERY-th request a
-- malformed body instead; count what was sent of each, the answers by status class, and the 2xx answers
-- per wall-clock second; print the run as one JSON line.
-- Usage: wrk -t2 -c64 -d60s -s handler/wrk_soak.lua URL -- BAD_EVERY good1.png ... bad-x.bad.bin bad-y.bad.json ...
-- Files named *.bad.* are the malformed bodies; *.json files go as application/json.

local threads = {}

function setup(thread)
  thread:set("id", #threads)
  table.insert(threads, thread)
end

local function read(path)
  local file = assert(io.open(path, "rb"))
  local body = file:read("*a")
  file:close()
  return body
end

function init(args)
  bad_every = tonumber(args[1])
  good, bad = {}, {}
  for i = 2, #args do
    local path = args[i]
    local content_type = path:match("%.json$") and "application/json" or "application/octet-stream"
    -- Formatted once here: building a request per call would cost wrk the time it measures.
    local request = wrk.format("POST", nil, {["Content-Type"] = content_type}, read(path))
    if path:match("%.bad%.") then bad[#bad + 1] = request else good[#good + 1] = request end
  end
  assert(#good > 0 and #bad > 0 and bad_every and bad_every > 1, "usage: -- BAD_EVERY good files... *.bad.* files...")
  sent, sent_good, sent_bad = id * 7, 0, 0  -- threads start at different files
  status_2xx, status_4xx, status_5xx, status_other = 0, 0, 0, 0
  ok_per_second = {}
end

function request()
  sent = sent + 1
  if sent % bad_every == 0 then
    sent_bad = sent_bad + 1
    return bad[math.floor(sent / bad_every) % #bad + 1]
  end
  sent_good = sent_good + 1
  return good[sent % #good + 1]
end

function response(status, headers, body)
  if status >= 200 and status < 300 then
    status_2xx = status_2xx + 1
    local second = os.time()
    ok_per_second[second] = (ok_per_second[second] or 0) + 1
  elseif status >= 400 and status < 500 then
    status_4xx = status_4xx + 1
  elseif status >= 500 then
    status_5xx = status_5xx + 1
  else
    status_other = status_other + 1
  end
end

function done(summary, latency, _)
  local totals = {sent_good = 0, sent_bad = 0, status_2xx = 0, status_4xx = 0, status_5xx = 0, status_other = 0}
  local seconds = {}
  for _, thread in ipairs(threads) do
    for key in pairs(totals) do totals[key] = totals[key] + thread:get(key) end
    for second, count in pairs(thread:get("ok_per_second")) do seconds[second] = (seconds[second] or 0) + count end
  end
  local per_second = {}
  for second, count in pairs(seconds) do per_second[#per_second + 1] = string.format('"%d": %d', second, count) end
  local errors = summary.errors
  io.write(string.format(
    '{"requests": %d, "seconds": %.6f, "p50_ms": %.3f, "p99_ms": %.3f, "max_ms": %.3f, '
      .. '"connect": %d, "read": %d, "write": %d, "timeout": %d, '
      .. '"sent_good": %d, "sent_bad": %d, "status_2xx": %d, "status_4xx": %d, "status_5xx": %d, "status_other": %d, '
      .. '"ok_per_second": {%s}}\n',
    summary.requests, summary.duration / 1e6, latency:percentile(50) / 1e3, latency:percentile(99) / 1e3, latency.max / 1e3,
    errors.connect, errors.read, errors.write, errors.timeout,
    totals.sent_good, totals.sent_bad, totals.status_2xx, totals.status_4xx, totals.status_5xx, totals.status_other,
    table.concat(per_second, ", ")))
end
