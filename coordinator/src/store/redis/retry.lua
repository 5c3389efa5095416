-- Puts the failed tasks of a job back in the queue with fresh attempts
-- (policy::retryable, policy::job_retryable): their attempts stay for the
-- record, counted from the retry on ('counted'), the job's per-worker fault
-- counts start again, and a finished job runs again (its keys no longer
-- expire). A shot whose anchor is not completed waits for it again. The same
-- as the memory store's `State::retry_failed`.
-- ARGV: 3 job. Returns {'missing'} or {'ok', tasks requeued}.
local job = ARGV[3]
local jk = k('job', job)
if redis.call('EXISTS', jk) == 0 then return {'missing'} end
if redis.call('HGET', jk, 'state') == JOB_CANCELLED then return {'ok', 0} end
local tasks = redis.call('LRANGE', k('job', job, 'tasks'), 0, -1)
local failed, done = {}, {}
for _, tid in ipairs(tasks) do
  local f = redis.call('HMGET', k('task', tid), 'state', 'index')
  if f[1] == TASK_FAILED then
    table.insert(failed, tid)
  elseif f[1] == TASK_COMPLETED then
    done[tonumber(f[2])] = true
  end
end
if #failed == 0 then return {'ok', 0} end
-- Undo `retire`: the job lives again.
for _, tid in ipairs(tasks) do redis.call('PERSIST', k('task', tid)) end
for _, suffix in ipairs({'tasks', 'leased', 'models', 'events', 'blobs', 'faults', 'waiting'}) do
  redis.call('PERSIST', k('job', job, suffix))
end
redis.call('PERSIST', jk)
local idem = redis.call('HGET', jk, 'idem')
if idem and idem ~= '' then
  redis.call('PERSIST', k('idem', redis.call('HGET', jk, 'project'), idem))
end
redis.call('HSET', jk, 'state', JOB_RUNNING, 'finished', 0)
redis.call('DEL', k('job', job, 'faults'))
for _, tid in ipairs(failed) do
  local t = k('task', tid)
  local f = redis.call('HMGET', t, 'index', 'model', 'depends', 'attempts', 'epoch')
  local index, depends = tonumber(f[1]), tonumber(f[3])
  redis.call('HSET', t, 'state', TASK_QUEUED, 'step', 0, 'counted', #cjson.decode(f[4]))
  redis.call('HINCRBY', jk, TASK_FAILED, -1)
  redis.call('HINCRBY', jk, TASK_QUEUED, 1)
  if depends >= 0 and not done[depends] then
    redis.call('RPUSH', k('job', job, 'waiting', depends), tid)
    redis.call('SADD', k('job', job, 'waiting'), tid)
  else
    requeue(job, tid, index, f[2])
  end
  event(job, EV_RETRIED, tid, index, '', tonumber(f[5]), FAULT_NONE, MSG_RETRIED)
end
wake_workers()
return {'ok', #failed}
