-- Takes back leases past their deadline: the epoch grows (fencing the old
-- holder) and the task is requeued, or failed after max attempts. Atomic, so
-- any number of coordinators may reap at once.
-- ARGV: 3 max attempts, 4 batch limit.
-- Returns REAPED_FIELDS values per reaped lease: task, job, worker, epoch,
-- requeued (0/1), finished state or ''.
local max, limit = tonumber(ARGV[3]), tonumber(ARGV[4])
local out = {}
for _, tid in ipairs(redis.call('ZRANGEBYSCORE', k('leases'), '-inf', NOW, 'LIMIT', 0, limit)) do
  local f = redis.call('HMGET', k('task', tid), 'state', 'job', 'holder', 'epoch', 'attempts')
  if f[1] ~= TASK_LEASED then
    redis.call('ZREM', k('leases'), tid)
  else
    local requeued = count_faults(cjson.decode(f[5]), counted_from(tid)) + 1 < max
    local to = TASK_FAILED
    if requeued then to = TASK_QUEUED end
    local finished = end_lease(tid, OUTCOME_EXPIRED, FAULT_WORKER_LOST, 'lease expired: no heartbeat before the deadline', to, EV_EXPIRED, true)
    local r = 0
    if requeued then r = 1 end
    for _, v in ipairs({tid, f[2], f[3], f[4], r, finished}) do table.insert(out, v) end
  end
end
return out
