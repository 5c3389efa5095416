-- Pauses or resumes a running job: a paused job stays on the ready set (it
-- keeps its place) but claim.lua leases nothing of it (policy::leasable).
-- A finished job, or one already so, is left as it is. The same as the
-- memory store's `State::set_paused`.
-- ARGV: 3 job, 4 paused (0/1). Returns {'missing'} or {'ok'}.
local job, paused = ARGV[3], ARGV[4]
local jk = k('job', job)
if redis.call('EXISTS', jk) == 0 then return {'missing'} end
local f = redis.call('HMGET', jk, 'state', 'paused')
if f[1] ~= JOB_RUNNING or (f[2] or '0') == paused then return {'ok'} end
redis.call('HSET', jk, 'paused', paused)
if paused == '1' then
  event(job, EV_PAUSED, '', 0, '', 0, FAULT_NONE, MSG_PAUSED)
else
  event(job, EV_RESUMED, '', 0, '', 0, FAULT_NONE, MSG_RESUMED)
  wake_workers()
end
return {'ok'}
