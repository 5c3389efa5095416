-- Opens a worker session; leases still held under the same id belong to a
-- dead incarnation and are requeued at once.
-- The session is bound to ARGV[7], the registering token's name ('' without
-- --auth): while it is alive, another token may not take the id over
-- (policy::may_register).
-- ARGV: 3 worker, 4 registration json, 5 models json ({name: hash}), 6 determinism class, 7 owner,
--   8 assets json ({asset key: true}, policy::held_keys).
-- Returns {'bound'}, or RELEASED_FIELDS values per released lease: task, job, epoch, finished state or ''.
local worker, owner = ARGV[3], ARGV[7]
local wk = k('worker', worker)
if redis.call('EXISTS', wk) == 1 and not acts_for(worker, owner) and alive(worker) then
  return {'bound'}
end
local out = {}
for _, tid in ipairs(redis.call('SMEMBERS', k('worker', worker, 'running'))) do
  local f = redis.call('HMGET', k('task', tid), 'state', 'job', 'epoch', 'holder')
  if f[1] == TASK_LEASED and f[4] == worker then
    local finished = end_lease(tid, OUTCOME_EXPIRED, FAULT_WORKER_LOST, 'the worker registered again: the old session is gone', TASK_QUEUED, EV_EXPIRED, true)
    for _, v in ipairs({tid, f[2], f[3], finished}) do table.insert(out, v) end
  end
end
redis.call('DEL', k('worker', worker, 'running'))
redis.call('HSET', wk, 'reg', ARGV[4], 'models', ARGV[5], 'class', ARGV[6], 'draining', 0, 'seen', NOW, 'resident', '[]', 'owner', owner, 'assets', ARGV[8])
-- A new session starts with no switch in flight (policy::still_loading).
redis.call('HDEL', wk, 'loading')
redis.call('HSETNX', wk, 'completed', 0)
redis.call('HSETNX', wk, 'failed', 0)
redis.call('SADD', k('workers'), worker)
wake_workers()
return out
