-- Shared by every kiln script (prepended at build time).
-- ARGV[1] is the key prefix (a hash tag such as "{kiln}", so every key of a farm
-- lives in one cluster slot); ARGV[2] is how long a finished job's keys live, in ms.
-- Every time is Redis server time: TIME, never a client's clock.
local P = ARGV[1]
local RETENTION = tonumber(ARGV[2])
local function k(...)
  return P .. ':' .. table.concat({...}, ':')
end
local T = redis.call('TIME')
local NOW = tonumber(T[1]) * 1000 + math.floor(tonumber(T[2]) / 1000)

-- Event kinds and fault classes: the kiln.v1 enum numbers.
local EV_LEASED, EV_COMPLETED, EV_FAILED, EV_EXPIRED, EV_CANCELLED, EV_STALE, EV_FINISHED = 1, 2, 3, 4, 5, 6, 7
local F_NONE, F_WORKER_LOST, F_BAD_INPUT, F_CANCELLED = 0, 1, 4, 5
-- Task state -> job counter field.
local COUNTER = {queued = 'queued', leased = 'leased', completed = 'completed', failed = 'failed', cancelled = 'cancelled'}

local function event(job, kind, task, index, worker, epoch, fault, msg)
  local seq = redis.call('HINCRBY', k('job', job), 'seq', 1)
  redis.call('XADD', k('job', job, 'events'), '0-' .. seq,
    'kind', kind, 'task', task or '', 'index', index or 0, 'worker', worker or '',
    'epoch', epoch or 0, 'fault', fault or 0, 'msg', msg or '', 'at', NOW)
  redis.call('PUBLISH', P .. ':events', job)
end

local function wake_workers()
  redis.call('PUBLISH', P .. ':work', '1')
end

-- Puts a queued task back on its model queue and its job on the ready set.
local function requeue(job, tid, index, model)
  redis.call('ZADD', k('q', job, model), index, tid)
  local prio = tonumber(redis.call('HGET', k('job', job), 'priority') or '0')
  if redis.call('HGET', k('job', job), 'state') == 'running' then
    redis.call('ZADD', k('ready'), -prio, job)
  end
end

-- Sets the expiry of every key of a finished job: the manifest in the result store is the durable record.
local function retire(job)
  local tasks = redis.call('LRANGE', k('job', job, 'tasks'), 0, -1)
  for _, tid in ipairs(tasks) do
    redis.call('PEXPIRE', k('task', tid), RETENTION)
  end
  for _, m in ipairs(redis.call('SMEMBERS', k('job', job, 'models'))) do
    redis.call('DEL', k('q', job, m))
  end
  for _, suffix in ipairs({'tasks', 'leased', 'models', 'events', 'blobs', 'faults', 'waiting'}) do
    redis.call('PEXPIRE', k('job', job, suffix), RETENTION)
  end
  redis.call('PEXPIRE', k('job', job), RETENTION)
  local idem = redis.call('HGET', k('job', job), 'idem')
  if idem and idem ~= '' then
    redis.call('PEXPIRE', k('idem', redis.call('HGET', k('job', job), 'project'), idem), RETENTION)
  end
  redis.call('ZREM', k('ready'), job)
end

-- Ends the job if nothing is queued or leased; returns its new state, or ''.
local function finish_if_done(job)
  local j = redis.call('HMGET', k('job', job), 'state', 'queued', 'leased', 'failed', 'cancelled')
  if j[1] ~= 'running' or tonumber(j[2]) ~= 0 or tonumber(j[3]) ~= 0 then
    return ''
  end
  local state = 'completed'
  if tonumber(j[4]) ~= 0 or tonumber(j[5]) ~= 0 then state = 'failed' end
  redis.call('HSET', k('job', job), 'state', state, 'finished', NOW)
  event(job, EV_FINISHED, '', 0, '', 0, F_NONE, 'JOB_STATE_' .. string.upper(state))
  retire(job)
  return state
end

-- Queues the shots waiting for the anchor at `index`, with its image as their init image.
local function release_dependents(job, index, sha)
  local list = k('job', job, 'waiting', index)
  local shots = redis.call('LRANGE', list, 0, -1)
  if #shots == 0 then return end
  for _, tid in ipairs(shots) do
    local f = redis.call('HMGET', k('task', tid), 'index', 'model', 'rhash')
    -- The init image is part of the recipe, so of its dedupe key (see create_job).
    redis.call('HSET', k('task', tid), 'init', sha, 'rhash', f[3] .. ':' .. sha)
    redis.call('SREM', k('job', job, 'waiting'), tid)
    requeue(job, tid, tonumber(f[1]), f[2])
  end
  redis.call('DEL', list)
  wake_workers()
end

-- Ends the shots waiting for the anchor at `index` (it failed or was cancelled).
local function end_dependents(job, index, to, ev_kind, msg)
  local list = k('job', job, 'waiting', index)
  for _, tid in ipairs(redis.call('LRANGE', list, 0, -1)) do
    redis.call('HSET', k('task', tid), 'state', to)
    redis.call('SREM', k('job', job, 'waiting'), tid)
    redis.call('HINCRBY', k('job', job), 'queued', -1)
    redis.call('HINCRBY', k('job', job), COUNTER[to], 1)
    event(job, ev_kind, tid, tonumber(redis.call('HGET', k('task', tid), 'index')), '', 0, F_BAD_INPUT, msg)
  end
  redis.call('DEL', list)
end

local function is_fault(outcome)
  return outcome == 'failed' or outcome == 'expired'
end

local function count_faults(attempts)
  local n = 0
  for _, a in ipairs(attempts) do
    if is_fault(a.outcome) then n = n + 1 end
  end
  return n
end

-- Ends the running attempt of a leased task and moves the task to `to`.
-- Returns the job's new state if this ended the job, else ''.
local function end_lease(tid, outcome, fault, msg, to, ev_kind, bump)
  local t = k('task', tid)
  local f = redis.call('HMGET', t, 'job', 'index', 'model', 'holder', 'epoch', 'attempts', 'avoid')
  local job, index, model, holder, epoch = f[1], tonumber(f[2]), f[3], f[4], tonumber(f[5])
  local attempts = cjson.decode(f[6])
  local a = attempts[#attempts]
  a.outcome = outcome
  a.fault = fault
  a.message = msg
  a.ended = NOW
  redis.call('HSET', t, 'attempts', cjson.encode(attempts), 'state', to, 'holder', '', 'deadline', 0)
  if bump then redis.call('HINCRBY', t, 'epoch', 1) end
  redis.call('ZREM', k('leases'), tid)
  redis.call('SREM', k('job', job, 'leased'), tid)
  if holder and holder ~= '' then
    redis.call('SREM', k('worker', holder, 'running'), tid)
    if is_fault(outcome) then
      local avoid = cjson.decode(f[7])
      table.insert(avoid, holder)
      redis.call('HSET', t, 'avoid', cjson.encode(avoid))
      redis.call('HINCRBY', k('worker', holder), 'failed', 1)
      redis.call('HINCRBY', k('job', job, 'faults'), holder, 1)
    elseif outcome == 'completed' then
      redis.call('HINCRBY', k('worker', holder), 'completed', 1)
    end
  end
  redis.call('HINCRBY', k('job', job), 'leased', -1)
  redis.call('HINCRBY', k('job', job), COUNTER[to], 1)
  if to == 'queued' then
    requeue(job, tid, index, model)
    wake_workers()
  end
  event(job, ev_kind, tid, index, holder, epoch, fault, msg)
  if to == 'failed' then end_dependents(job, index, 'failed', EV_FAILED, 'its anchor failed') end
  if to == 'cancelled' then end_dependents(job, index, 'cancelled', EV_CANCELLED, 'job cancelled') end
  return finish_if_done(job)
end

-- Why (worker, epoch) does not hold the task.
local function stale_reason(tid, worker, epoch)
  local f = redis.call('HMGET', k('task', tid), 'state', 'epoch', 'holder')
  local state, cur, holder = f[1], tonumber(f[2]), f[3]
  if state == 'cancelled' then return 'the job was cancelled' end
  if state == 'completed' then
    return 'task already completed under epoch ' .. cur .. ' (this report: epoch ' .. epoch .. ')'
  end
  if state == 'failed' then return 'the task already failed for good' end
  if state == 'leased' and cur ~= epoch then
    return 'lease lost: epoch ' .. epoch .. ' < ' .. cur .. ' (the lease expired and the task went to ' .. holder .. ')'
  end
  if state == 'leased' then return 'lease held by ' .. holder .. ', not ' .. worker end
  return 'lease lost: epoch ' .. epoch .. ' expired and the task is queued again (epoch ' .. cur .. ')'
end

local function holds(tid, worker, epoch)
  local f = redis.call('HMGET', k('task', tid), 'state', 'epoch', 'holder')
  return f[1] == 'leased' and tonumber(f[2]) == epoch and f[3] == worker
end
