-- Extends the leases a worker still holds under the reported epochs and records progress.
-- ARGV: 3 worker, 4 ttl ms, 5 owner, then PROGRESS_FIELDS values (task, epoch, step) per task.
-- Returns {'unknown'}, {'bound'} or {drain (0/1), then per task 'ext', or the abandon reason}.
local worker, ttl = ARGV[3], tonumber(ARGV[4])
local wk = k('worker', worker)
if redis.call('EXISTS', wk) == 0 then return {'unknown'} end
if not acts_for(worker, ARGV[5]) then return {'bound'} end
redis.call('HSET', wk, 'seen', NOW)
local drain = 0
if redis.call('HGET', wk, 'draining') == '1' then drain = 1 end
local out = {drain}
local i = 6
while i + PROGRESS_FIELDS - 1 <= #ARGV do
  local tid, epoch, step = ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
  if holds(tid, worker, epoch) then
    local steps = tonumber(redis.call('HGET', k('task', tid), 'steps'))
    if step > steps then step = steps end
    redis.call('HSET', k('task', tid), 'deadline', NOW + ttl, 'step', step)
    redis.call('ZADD', k('leases'), NOW + ttl, tid)
    table.insert(out, 'ext')
  elseif redis.call('HGET', k('task', tid), 'state') == TASK_CANCELLED then
    table.insert(out, ABANDON_CANCELLED)
  else
    table.insert(out, ABANDON_LEASE_LOST)
  end
  i = i + PROGRESS_FIELDS
end
return out
