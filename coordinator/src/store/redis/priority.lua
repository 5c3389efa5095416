-- Sets a running job's priority (policy::job_rank reads it at every claim);
-- a finished job is left as it is. The same as `State::set_priority`.
-- ARGV: 3 job, 4 priority. Returns {'missing'} or {'ok'}.
local job, prio = ARGV[3], tonumber(ARGV[4])
local jk = k('job', job)
if redis.call('EXISTS', jk) == 0 then return {'missing'} end
if redis.call('HGET', jk, 'state') ~= JOB_RUNNING then return {'ok'} end
redis.call('HSET', jk, 'priority', prio)
if redis.call('ZSCORE', k('ready'), job) then redis.call('ZADD', k('ready'), -prio, job) end
event(job, EV_REPRIORITIZED, '', 0, '', 0, FAULT_NONE, MSG_PRIORITY .. ARGV[4])
wake_workers()
return {'ok'}
