-- wrk script: POST the files named after `--` in turn (one per request), and print the run as one JSON line.
-- Usage: wrk -t2 -c64 -d15s -s bench/wrk_post.lua http://127.0.0.1:8080/predictions/mnist -- a.png b.png ...

local requests = {}
local next_index = 0
local threads = 0

function setup(thread)
  -- Runs in wrk's main state once per thread: give each thread its own starting file, so the
  -- threads' concurrent requests carry different digits.
  thread:set("first", threads * 7)
  threads = threads + 1
end

function init(args)
  for _, path in ipairs(args) do
    local file = assert(io.open(path, "rb"))
    local body = file:read("*a")
    file:close()
    -- Formatted once here: building a request per call would cost wrk the time it measures.
    -- image/png, not application/octet-stream: KServe's v1 endpoint (the peer) parses the latter as JSON.
    requests[#requests + 1] = wrk.format("POST", nil, {["Content-Type"] = "image/png"}, body)
  end
  assert(#requests > 0, "name the files to send after --")
  next_index = first % #requests
end

function request()
  next_index = next_index % #requests + 1
  return requests[next_index]
end

function done(summary, latency, _)
  local errors = summary.errors
  io.write(string.format(
    '{"requests": %d, "seconds": %.6f, "p50_ms": %.3f, "p99_ms": %.3f, '
      .. '"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}\n',
    summary.requests, summary.duration / 1e6, latency:percentile(50) / 1e3, latency:percentile(99) / 1e3,
    errors.connect, errors.read, errors.write, errors.status, errors.timeout))
end
