-- Accepts a result if the worker holds the lease under the epoch; a replay of
-- the same accepted completion is accepted again; anything else is stale.
-- ARGV: 3 worker, 4 task, 5 epoch, 6 result json.
-- Returns {'ok', finished job state or ''}, {'stale', reason} or {'missing'}.
local worker, tid, epoch = ARGV[3], ARGV[4], tonumber(ARGV[5])
local t = k('task', tid)
if redis.call('EXISTS', t) == 0 then return {'missing'} end
if holds(tid, worker, epoch) then
  redis.call('HSET', t, 'result', ARGV[6], 'step', redis.call('HGET', t, 'steps'))
  return {'ok', end_lease(tid, 'completed', F_NONE, '', 'completed', EV_COMPLETED, false)}
end
local f = redis.call('HMGET', t, 'state', 'epoch', 'attempts', 'job', 'index')
if f[1] == 'completed' and tonumber(f[2]) == epoch then
  local attempts = cjson.decode(f[3])
  if attempts[#attempts].worker == worker then return {'ok', ''} end
end
local reason = stale_reason(tid, worker, epoch)
event(f[4], EV_STALE, tid, tonumber(f[5]), worker, epoch, F_NONE, reason)
return {'stale', reason}
