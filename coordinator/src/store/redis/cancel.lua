-- Cancels a running job: queued and leased tasks become cancelled at once
-- (holders learn it at their next heartbeat). A finished job is left as is.
-- ARGV: 3 job. Returns {'missing'} or {'ok'}.
local job = ARGV[3]
local jk = k('job', job)
if redis.call('EXISTS', jk) == 0 then return {'missing'} end
if redis.call('HGET', jk, 'state') ~= JOB_RUNNING then return {'ok'} end
-- Mark the job first, so ending its leases below does not finish it as failed.
redis.call('HSET', jk, 'state', JOB_CANCELLED, 'finished', NOW)
local n = 0
for _, m in ipairs(redis.call('SMEMBERS', k('job', job, 'models'))) do
  for _, tid in ipairs(redis.call('ZRANGE', k('q', job, m), 0, -1)) do
    redis.call('HSET', k('task', tid), 'state', TASK_CANCELLED)
    n = n + 1
  end
  redis.call('DEL', k('q', job, m))
end
for _, tid in ipairs(redis.call('SMEMBERS', k('job', job, 'waiting'))) do
  redis.call('HSET', k('task', tid), 'state', TASK_CANCELLED)
  -- And its anchor's list of waiting shots: ending a leased anchor below must not end them twice.
  redis.call('DEL', k('job', job, 'waiting', redis.call('HGET', k('task', tid), 'depends')))
  n = n + 1
end
redis.call('DEL', k('job', job, 'waiting'))
-- Only when n > 0: for n = 0, Lua sends -n as "-0", which HINCRBY refuses.
if n > 0 then
  redis.call('HINCRBY', jk, TASK_QUEUED, -n)
  redis.call('HINCRBY', jk, TASK_CANCELLED, n)
end
for _, tid in ipairs(redis.call('SMEMBERS', k('job', job, 'leased'))) do
  end_lease(tid, OUTCOME_CANCELLED, FAULT_CANCELLED, 'job cancelled', TASK_CANCELLED, EV_CANCELLED, true)
end
event(job, EV_JOB_FINISHED, '', 0, '', 0, FAULT_NONE, JOB_CANCELLED)
retire(job)
return {'ok'}
