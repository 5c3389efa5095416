-- Records a fault under the lease's epoch. The task is requeued (to be
-- retried, elsewhere when possible) unless the fault is bad input, the
-- attempts are used up, or the fault leaves the worker quarantined for the job
-- while no other worker can take the task (it would wait forever); a worker's
-- cancelled fault hands the task back without counting against the limit.
-- The same rules as `MemoryStore::fail`, through `policy::retry_after_fault`.
-- ARGV: 3 worker, 4 task, 5 epoch, 6 fault name, 7 message, 8 max attempts, 9 owner.
-- Returns {'ok', will_retry (0/1), finished state or ''}, {'stale', reason}, {'bound'} or {'missing'}.
local worker, tid, epoch, fault, msg, max = ARGV[3], ARGV[4], tonumber(ARGV[5]), ARGV[6], ARGV[7], tonumber(ARGV[8])
if not acts_for(worker, ARGV[9]) then return {'bound'} end
local t = k('task', tid)
if redis.call('EXISTS', t) == 0 then return {'missing'} end
if not holds(tid, worker, epoch) then return {'stale', stale_reason(tid, worker, epoch)} end
local handback = fault == FAULT_CANCELLED
local used = count_faults(cjson.decode(redis.call('HGET', t, 'attempts')), counted_from(tid))
if not handback then used = used + 1 end
local retry = handback or (fault ~= FAULT_BAD_INPUT and used < max)
local stranded = false
if retry and not handback then
  local f = redis.call('HMGET', t, 'job', 'model', 'mhash', 'needs')
  local j = redis.call('HMGET', k('job', f[1]), 'pin', 'class')
  local faults = tonumber(redis.call('HGET', k('job', f[1], 'faults'), worker) or '0') + 1
  local pinned = ''
  if j[1] == '1' then pinned = j[2] or '' end
  if faults >= QUARANTINE_AFTER and not stand_in_exists(f[1], f[2], f[3], f[4], worker, pinned, nil) then
    stranded, retry = true, false
  end
end
local outcome, to = OUTCOME_FAILED, TASK_FAILED
if handback then outcome, to = OUTCOME_CANCELLED, TASK_QUEUED
elseif retry then to = TASK_QUEUED end
local note
if retry then note = msg .. ' (will retry)'
elseif stranded then
  note = msg .. ' (no retry: ' .. worker .. ' is quarantined for this job and no other worker can take the task)'
else note = msg .. ' (no retry: ' .. used .. ' of ' .. max .. ' attempts used)' end
local finished = end_lease(tid, outcome, fault, note, to, EV_FAILED, false)
local r = 0
if retry then r = 1 end
return {'ok', r, finished}
