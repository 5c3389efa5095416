-- Accepts a result if the worker holds the lease under the epoch; a replay of
-- the same accepted completion is accepted again; anything else is stale.
-- ARGV: 3 worker, 4 task, 5 epoch, 6 result json, 7 owner.
-- Returns {'ok', finished job state or ''}, {'stale', reason}, {'bound'} or {'missing'}.
local worker, tid, epoch = ARGV[3], ARGV[4], tonumber(ARGV[5])
if not acts_for(worker, ARGV[7]) then return {'bound'} end
local t = k('task', tid)
-- Whether the task exists and the worker holds it, in one read.
local h = redis.call('HMGET', t, 'state', 'epoch', 'holder')
if not h[1] then return {'missing'} end
if held_by(h, worker, epoch) then
  -- The store records the worker's class with the result.
  local result = cjson.decode(ARGV[6])
  result.class = redis.call('HGET', k('worker', worker), 'class') or ''
  local encoded = cjson.encode(result)
  redis.call('HSET', t, 'result', encoded, 'step', redis.call('HGET', t, 'steps'))
  local f = redis.call('HMGET', t, 'job', 'index', 'file', 'rhash')
  local job = f[1]
  local j = redis.call('HMGET', k('job', job), 'dedupe', 'project')
  if j[1] == '1' then
    result.object = job .. '/' .. f[3]
    redis.call('HSET', k('results', j[2]), f[4] .. '|' .. result.class, cjson.encode(result))
  end
  release_dependents(job, tonumber(f[2]), result.sha256)
  return {'ok', end_lease(tid, OUTCOME_COMPLETED, FAULT_NONE, '', TASK_COMPLETED, EV_COMPLETED, false, result.render_ms or 0)}
end
local f = redis.call('HMGET', t, 'state', 'epoch', 'attempts', 'job', 'index')
if f[1] == TASK_COMPLETED and tonumber(f[2]) == epoch then
  local attempts = cjson.decode(f[3])
  if attempts[#attempts].worker == worker then return {'ok', ''} end
end
local reason = stale_reason(tid, worker, epoch)
event(f[4], EV_STALE_REFUSED, tid, tonumber(f[5]), worker, epoch, FAULT_NONE, reason)
return {'stale', reason}
