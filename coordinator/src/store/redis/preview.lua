-- Keeps a task's latest live preview, for a TTL, while the worker holds its lease.
-- ARGV: 3 worker, 4 task, 5 epoch, 6 step, 7 png, 8 ttl ms.
-- Returns 1 when kept, 0 when the worker does not hold the lease under that epoch.
-- `end_lease` (prelude) deletes the key, so a preview never outlives its lease.
local worker, tid, epoch = ARGV[3], ARGV[4], tonumber(ARGV[5])
if not holds(tid, worker, epoch) then return 0 end
local key = k('preview', tid)
redis.call('HSET', key, 'step', ARGV[6], 'png', ARGV[7])
redis.call('PEXPIRE', key, tonumber(ARGV[8]))
return 1
