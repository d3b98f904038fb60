-- wrk script for the balance scenario: count responses per serving pid.
-- The demo app's `/` answers {"hello": ..., "worker": ..., "pid": N}. Each wrk
-- thread has its own Lua state, so `setup` keeps every thread and `done` (run in
-- the main state after the test) collects each thread's global `counts` table.

local threads = {}

function setup(thread)
   table.insert(threads, thread)
end

function init(args)
   counts = {}
end

function response(status, headers, body)
   local pid = body and string.match(body, '"pid":%s*(%d+)')
   if pid then
      counts[pid] = (counts[pid] or 0) + 1
   end
end

function done(summary, latency, requests)
   local total = {}
   for _, thread in ipairs(threads) do
      local c = thread:get("counts")
      if c then
         for pid, n in pairs(c) do
            total[pid] = (total[pid] or 0) + n
         end
      end
   end
   for pid, n in pairs(total) do
      io.write(string.format("BENCH_PID %s %d\n", pid, n))
   end
end
