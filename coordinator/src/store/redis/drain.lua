-- Marks a worker draining: it gets no new leases. ARGV: 3 worker. Returns 1, or 0 if unknown.
local wk = k('worker', ARGV[3])
if redis.call('EXISTS', wk) == 0 then return 0 end
redis.call('HSET', wk, 'draining', 1)
return 1
