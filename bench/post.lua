-- wrk script for `make bench`: POST one held-out row as JSON, with an X-User-ID that
-- cycles over BENCH_USERS users, and print a machine-readable summary line at the end.
--
-- Environment (wrk passes no arguments to setup(), so the harness uses variables):
--   BENCH_BODY_FILE  file holding the request body (required)
--   BENCH_USERS      how many distinct X-User-ID values to cycle through (default 1000)
--   BENCH_TARGETS    optional "host:port,host:port": thread i connects to target i mod n
--                    instead of the URL's address (direct runs spread over both backends)

local body_file = os.getenv("BENCH_BODY_FILE")
local users = tonumber(os.getenv("BENCH_USERS") or "1000")
local targets = os.getenv("BENCH_TARGETS") or ""
local threads_set_up = 0

function setup(thread)
  threads_set_up = threads_set_up + 1
  thread:set("thread_index", threads_set_up)
  if targets ~= "" then
    local list = {}
    for hostport in string.gmatch(targets, "[^,]+") do
      table.insert(list, hostport)
    end
    local host, port = string.match(list[(threads_set_up - 1) % #list + 1], "^(.+):(%d+)$")
    thread.addr = wrk.lookup(host, port)[1]
  end
end

local body
local counter = 0

function init(args)
  local file = assert(io.open(body_file, "rb"))
  body = file:read("*a")
  file:close()
  -- threads start at different users so that they do not send the same sequence
  counter = (thread_index or 1) * 7919
end

function request()
  counter = counter + 1
  return wrk.format("POST", nil, {
    ["Content-Type"] = "application/json",
    ["X-User-ID"] = "user-" .. (counter % users),
  }, body)
end

function done(summary, latency, requests)
  local errors = summary.errors
  io.write(string.format(
    "BENCH_JSON {\"requests\": %d, \"duration_us\": %d, \"bytes\": %d, " ..
    "\"connect_errors\": %d, \"read_errors\": %d, \"write_errors\": %d, \"status_errors\": %d, " ..
    "\"timeouts\": %d, \"latency_p50_us\": %d, \"latency_p99_us\": %d, \"latency_max_us\": %d}\n",
    summary.requests, summary.duration, summary.bytes,
    errors.connect, errors.read, errors.write, errors.status, errors.timeout,
    latency:percentile(50), latency:percentile(99), latency.max))
end
