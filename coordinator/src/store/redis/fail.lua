-- Records a fault under the lease's epoch: requeue (retry elsewhere) unless
-- the fault is bad input or the attempts are used up; a worker's CANCELLED
-- hands the task back without counting against the limit.
-- ARGV: 3 worker, 4 task, 5 epoch, 6 fault, 7 message, 8 max attempts.
-- Returns {'ok', will_retry (0/1), finished state or ''}, {'stale', reason} or {'missing'}.
local worker, tid, epoch, fault, msg, max = ARGV[3], ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6]), ARGV[7], tonumber(ARGV[8])
local t = k('task', tid)
if redis.call('EXISTS', t) == 0 then return {'missing'} end
if not holds(tid, worker, epoch) then return {'stale', stale_reason(tid, worker, epoch)} end
local handback = fault == F_CANCELLED
local used = count_faults(cjson.decode(redis.call('HGET', t, 'attempts')))
if not handback then used = used + 1 end
local retry = handback or (fault ~= F_BAD_INPUT and used < max)
local outcome, to = 'failed', 'failed'
if handback then outcome, to = 'cancelled', 'queued'
elseif retry then to = 'queued' end
local note
if retry then note = msg .. ' (will retry)'
else note = msg .. ' (no retry: ' .. used .. ' of ' .. max .. ' attempts used)' end
local finished = end_lease(tid, outcome, fault, note, to, EV_FAILED, false)
local r = 0
if retry then r = 1 end
return {'ok', r, finished}
