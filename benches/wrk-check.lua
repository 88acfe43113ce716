-- Counts answers that are not a 200 with GraphQL data: Mosaic reports a refused token as
-- HTTP 200 with an "errors" array, so the status alone would hide it.
local failures = 0
local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function response(status, headers, body)
  if status ~= 200 or string.find(body, '"errors"', 1, true) then
    failures = failures + 1
  end
end

function done(summary, latency, requests)
  local total = 0
  for _, thread in ipairs(threads) do
    total = total + (thread:get("failures") or 0)
  end
  io.write(string.format("requests: %d, failed (status or GraphQL error): %d\n",
    summary.requests, total))
end
