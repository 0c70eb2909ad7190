-- wrk script for `make soak` (bench/soak.py): POST real digit PNGs and, every BAD_EVERY-th request, a
-- malformed body instead; count each answer against the kind of request it answers, per kind and per second.
-- Usage: wrk -t64 -c64 -d60s -s bench/wrk_soak.lua URL -- BAD_EVERY digit.png ... KIND|CONTENT-TYPE|PATH ...
-- Digits go as image/png; each KIND|CONTENT-TYPE|PATH is a malformed body of that kind.
--
-- Run it with one connection per thread (-t equal to -c): wrk's response() does not say which request it
-- answers, but a thread with one connection alternates request() and response(), so `pending` does.
-- done() prints one JSON line: wrk's summary; "counts" keyed "KIND sent", "KIND 2xx|4xx|5xx|other" and
-- "KIND unanswered" (in flight when wrk stopped); "resent" (requests sent again because no answer came: wrk
-- reconnected after a dropped connection, which it counts as a socket error, or the first write did not
-- start); "ok_per_second" (digits answered 2xx) and "failed_per_second" (a digit answered other than 2xx,
-- a malformed body other than 4xx), keyed by epoch second.

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

local function add(counter, key)
  counter[key] = (counter[key] or 0) + 1
end

function init(args)
  bad_every = tonumber(args[1])
  good, bad = {}, {}
  for i = 2, #args do
    local kind, content_type, path = args[i]:match("^([^|]+)|([^|]+)|(.+)$")
    -- Formatted once here: building a request per call would cost wrk the time it measures.
    local request = wrk.format("POST", nil, {["Content-Type"] = content_type or "image/png"}, read(path or args[i]))
    if kind then bad[#bad + 1] = {kind = kind, request = request} else good[#good + 1] = request end
  end
  assert(#good > 0 and #bad > 0 and bad_every and bad_every > 1,
         "usage: -- BAD_EVERY digit.png... KIND|CONTENT-TYPE|PATH...")
  sent = id * 7  -- threads start at different digits and kinds
  pending, last = nil, nil  -- the kind of the request on the connection, until its answer, and the request
  counts, ok_per_second, failed_per_second, resent = {}, {}, {}, 0
end

function request()
  if pending then  -- no answer to the last request: send it again, counted once
    resent = resent + 1
    return last
  end
  sent = sent + 1
  if sent % bad_every == 0 then
    local body = bad[math.floor(sent / bad_every) % #bad + 1]
    pending, last = body.kind, body.request
  else
    pending, last = "good", good[sent % #good + 1]
  end
  add(counts, pending .. " sent")
  return last
end

function response(status)
  local kind = pending or "unmatched"
  pending = nil
  local class = (status >= 200 and status < 300 and "2xx") or (status >= 400 and status < 500 and "4xx")
    or (status >= 500 and "5xx") or "other"
  add(counts, kind .. " " .. class)
  if class == (kind == "good" and "2xx" or "4xx") then
    if kind == "good" then add(ok_per_second, os.time()) end
  else
    add(failed_per_second, os.time())
  end
end

local function json_object(counter)
  local items = {}
  for key, count in pairs(counter) do items[#items + 1] = string.format('"%s": %d', key, count) end
  return "{" .. table.concat(items, ", ") .. "}"
end

function done(summary, latency, _)
  local counts, ok, failed, resent = {}, {}, {}, 0
  local function merge(into, from)
    for key, count in pairs(from) do into[key] = (into[key] or 0) + count end
  end
  for _, thread in ipairs(threads) do
    merge(counts, thread:get("counts"))
    merge(ok, thread:get("ok_per_second"))
    merge(failed, thread:get("failed_per_second"))
    resent = resent + thread:get("resent")
    local in_flight = thread:get("pending")
    if in_flight then add(counts, in_flight .. " unanswered") end
  end
  local errors = summary.errors
  io.write(string.format(
    '{"requests": %d, "seconds": %.6f, "p50_ms": %.3f, "p99_ms": %.3f, "max_ms": %.3f, '
      .. '"connect": %d, "read": %d, "write": %d, "timeout": %d, "resent": %d, '
      .. '"counts": %s, "ok_per_second": %s, "failed_per_second": %s}\n',
    summary.requests, summary.duration / 1e6, latency:percentile(50) / 1e3, latency:percentile(99) / 1e3,
    latency.max / 1e3, errors.connect, errors.read, errors.write, errors.timeout, resent,
    json_object(counts), json_object(ok), json_object(failed)))
end
