-- Shared by every kiln script (prepended at build time, after the constants
-- that redis/scripts.rs generates from the Rust definitions: policy numbers,
-- argument and reply layouts, and the names of states, outcomes, faults and
-- event kinds. No script writes a number or a name of its own).
-- ARGV[1] is the key prefix (a hash tag such as "{kiln}", so every key of a farm
-- lives in one cluster slot); ARGV[2] is how long a finished job's keys live, in ms.
-- Every time is Redis server time: TIME, never a client's clock.
local P = ARGV[1]
local RETENTION = tonumber(ARGV[2])
-- A key from up to four parts; concatenated directly rather than through a
-- table, since every script builds dozens of keys per task.
local function k(a, b, c, d)
  if d ~= nil then return P .. ':' .. a .. ':' .. b .. ':' .. c .. ':' .. d end
  if c ~= nil then return P .. ':' .. a .. ':' .. b .. ':' .. c end
  if b ~= nil then return P .. ':' .. a .. ':' .. b end
  return P .. ':' .. a
end
local T = redis.call('TIME')
local NOW = tonumber(T[1]) * MS_PER_S + math.floor(tonumber(T[2]) / US_PER_MS)

-- An integer as a command argument. Redis 7.0 formats a Lua number passed
-- to redis.call with "%.17g", and Lua concatenates one with "%.14g": glibc's
-- float formatting, some 5% of Redis's time on the dispatch path. '%d'
-- gives the same digits for the integers kiln passes (times, counts,
-- epochs, indexes); constant arguments are written as strings ('1').
local function int(x)
  return string.format('%d', x)
end
local now_arg = int(NOW)

-- A JSON value as Lua; the empty object and list, which most stored lists
-- and claim arguments are, without cjson.
local function decode(json)
  if json == '[]' or json == '{}' then return {} end
  return cjson.decode(json)
end

-- Counters (hash fields holding integers) that a run of dispatch.lua keeps
-- here and writes once at its end (`flush_counters`): a run serves many
-- calls, and most of them move the same few counters (the job's task counts
-- and event sequence, the project's running and served marks, the day's
-- usage, the served sequence). Only dispatch.lua sets `buffered`; every other
-- script writes through at once. Within a buffered run every read of these
-- fields goes through `counter` or `counter_seen`, so it sees the run's own
-- changes; nothing outside the run can look before the flush (Redis runs a
-- script alone).
local buffered = false
-- key -> field -> {base = value in Redis or nil (not read), delta = change}.
local counters = {}

local function counter_slot(key, field)
  local h = counters[key]
  if h == nil then h = {}; counters[key] = h end
  local c = h[field]
  if c == nil then c = {delta = 0}; h[field] = c end
  return c
end

-- True when the run knows a counter's value without reading Redis.
local function known(key, field)
  local h = counters[key]
  return buffered and h ~= nil and h[field] ~= nil and h[field].base ~= nil
end

-- The value of a counter; `raw` is the field as a read of this run returned
-- it (HGET, HMGET), which seeds the base the first time.
local function counter_seen(key, field, raw)
  if not buffered then return tonumber(raw or '0') end
  local c = counter_slot(key, field)
  if c.base == nil then c.base = tonumber(raw or '0') end
  return c.base + c.delta
end

-- The value of a counter, read from Redis on its first use in the run.
local function counter(key, field)
  if known(key, field) then return counter_seen(key, field) end
  return counter_seen(key, field, redis.call('HGET', key, field))
end

-- The values of several counters of one hash, in one read of those the run
-- does not know yet; returned in the order asked.
local function counts(key, ...)
  local fields = {...}
  local missing = {}
  for _, field in ipairs(fields) do
    if not known(key, field) then table.insert(missing, field) end
  end
  local read = {}
  if #missing > 0 then
    local got = redis.call('HMGET', key, unpack(missing))
    for i, field in ipairs(missing) do read[field] = got[i] end
  end
  local out = {}
  for i, field in ipairs(fields) do out[i] = counter_seen(key, field, read[field]) end
  return unpack(out)
end

-- Adds `n` to a counter whose value this run does not need: no read, one
-- HINCRBY per field and run when buffered.
local function bump(key, field, n)
  if not buffered then
    redis.call('HINCRBY', key, field, int(n))
    return
  end
  local c = counter_slot(key, field)
  c.delta = c.delta + n
end

-- Adds `n` to a counter and returns its new value (HINCRBY).
local function add(key, field, n)
  if not buffered then return redis.call('HINCRBY', key, field, int(n)) end
  bump(key, field, n)
  return counter(key, field)
end

-- Sets a counter to `v` (a mark such as the served sequence).
local function set_counter(key, field, v)
  if not buffered then
    redis.call('HSET', key, field, int(v))
    return
  end
  local c = counter_slot(key, field)
  c.base, c.delta = v, 0
  c.set = true
end

-- The served sequence (a string key, INCR): the mark of the latest lease,
-- by which fair share orders jobs and projects.
local served_base, served_delta = nil, 0
local function next_served()
  if not buffered then return int(redis.call('INCR', k('served'))) end
  if served_base == nil then served_base = tonumber(redis.call('GET', k('served')) or '0') end
  served_delta = served_delta + 1
  return int(served_base + served_delta)
end

-- Deletes a counter that has fallen to zero or below (HDEL), as the
-- `project_running` hash keeps only projects with leases; buffered, at the
-- flush, if it is still spent then.
local function drop_if_spent(key, field)
  if not buffered then
    redis.call('HDEL', key, field)
    return
  end
  counter_slot(key, field).drop = true
end

-- Writes the run's counters: one HSET per key for those it read or set, one
-- HINCRBY per field for those it only added to.
local function flush_counters()
  for key, fields in pairs(counters) do
    local absolute = {}
    for field, c in pairs(fields) do
      if c.drop and c.base ~= nil and c.base + c.delta <= 0 then
        redis.call('HDEL', key, field)
      elseif c.base ~= nil and (c.delta ~= 0 or c.set) then
        table.insert(absolute, field)
        table.insert(absolute, int(c.base + c.delta))
      elseif c.base == nil and c.delta ~= 0 then
        redis.call('HINCRBY', key, field, int(c.delta))
      end
    end
    if #absolute > 0 then redis.call('HSET', key, unpack(absolute)) end
  end
  counters = {}
  if served_delta ~= 0 then redis.call('SET', k('served'), int(served_base + served_delta)) end
  served_base, served_delta = nil, 0
end

-- What a run reads once and keeps: facts that only other scripts change,
-- or that this run changes through the functions below, so a run of many
-- calls (dispatch.lua) reads them once. Every script run starts afresh.
-- A job's fault counts by worker ({job, 'faults'}), read whole.
local faults_of_job = {}
local function job_faults(job)
  local f = faults_of_job[job]
  if f == nil then
    f = {}
    local flat = redis.call('HGETALL', k('job', job, 'faults'))
    for i = 1, #flat, 2 do f[flat[i]] = tonumber(flat[i + 1]) end
    faults_of_job[job] = f
  end
  return f
end
-- A worker's fault count in a job.
local function faults_of(job, w)
  return job_faults(job)[w] or 0
end
-- Counts a fault of worker `w` in a job.
local function count_fault(job, w)
  redis.call('HINCRBY', k('job', job, 'faults'), w, '1')
  if faults_of_job[job] ~= nil then faults_of_job[job][w] = (faults_of_job[job][w] or 0) + 1 end
end

-- Whether a job may have shots waiting for an anchor: the `shots` field
-- enqueue.lua writes ('0': none); a job stored before it had the field may.
local shots_of_job = {}
local function may_have_shots(job)
  if shots_of_job[job] == nil then
    shots_of_job[job] = redis.call('HGET', k('job', job), 'shots') ~= '0'
  end
  return shots_of_job[job]
end

-- The projects at their max_running_tasks whose waiting claims wait for a
-- lease to end ({project_capped}).
local capped_projects
local function capped()
  if capped_projects == nil then
    capped_projects = {}
    for _, p in ipairs(redis.call('SMEMBERS', k('project_capped'))) do capped_projects[p] = true end
  end
  return capped_projects
end
local function mark_capped(project)
  if not capped()[project] then
    redis.call('SADD', k('project_capped'), project)
    capped_projects[project] = true
  end
end
-- Takes a project off the capped set; true if it was on it.
local function uncap(project)
  if not capped()[project] then return false end
  redis.call('SREM', k('project_capped'), project)
  capped_projects[project] = nil
  return true
end

-- Wake-ups are published once per job (events) and once (work) per script
-- run: a subscriber reads the state only after the whole script has run, so
-- a second message of the same run would wake it for nothing. A run that
-- serves several calls at once (dispatch.lua) publishes once for all.
local published, woken = {}, false

local function event(job, kind, task, index, worker, epoch, fault, msg)
  local seq = add(k('job', job), 'seq', 1)
  redis.call('XADD', k('job', job, 'events'), '0-' .. int(seq),
    'kind', kind, 'task', task or '', 'index', int(index or 0), 'worker', worker or '',
    'epoch', int(epoch or 0), 'fault', fault or FAULT_NONE, 'msg', msg or '', 'at', now_arg)
  if not published[job] then
    published[job] = true
    redis.call('PUBLISH', P .. ':events', job)
  end
end

local function wake_workers()
  if not woken then
    woken = true
    redis.call('PUBLISH', P .. ':work', '1')
  end
end

-- Puts a queued task back on its model queue and its job on the ready set.
local function requeue(job, tid, index, model)
  redis.call('ZADD', k('q', job, model), index, tid)
  local prio = tonumber(redis.call('HGET', k('job', job), 'priority') or '0')
  if redis.call('HGET', k('job', job), 'state') == JOB_RUNNING then
    redis.call('ZADD', k('ready'), -prio, job)
  end
end

-- Opens the webhook delivery of a job that just ended, if it has targets: its
-- pending targets, claim count and end time in {outbox}:JOB, due now in {outbox}.
local function open_delivery(job)
  local targets = redis.call('HGET', k('job', job), 'notify')
  if not targets or targets == '' or redis.call('EXISTS', k('outbox', job)) == 1 then return end
  redis.call('HSET', k('outbox', job), 'pending', targets, 'attempt', 0, 'ended', NOW)
  redis.call('ZADD', k('outbox'), NOW, job)
end

-- Sets the expiry of every key of a finished job: the manifest in the result store is the durable record.
-- Every transition that ends a job calls it, so it also opens the job's webhook delivery.
local function retire(job)
  open_delivery(job)
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
  local jk = k('job', job)
  local queued, leased, failed, cancelled = counts(jk, TASK_QUEUED, TASK_LEASED, TASK_FAILED, TASK_CANCELLED)
  if queued ~= 0 or leased ~= 0 or redis.call('HGET', jk, 'state') ~= JOB_RUNNING then
    return ''
  end
  local state = JOB_COMPLETED
  if failed ~= 0 or cancelled ~= 0 then state = JOB_FAILED end
  redis.call('HSET', jk, 'state', state, 'finished', NOW)
  event(job, EV_JOB_FINISHED, '', 0, '', 0, FAULT_NONE, state)
  retire(job)
  return state
end

-- Queues the shots waiting for the anchor at `index`, with its image as their init image.
local function release_dependents(job, index, sha)
  if not may_have_shots(job) then return end
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
  if not may_have_shots(job) then return end
  local list = k('job', job, 'waiting', index)
  for _, tid in ipairs(redis.call('LRANGE', list, 0, -1)) do
    redis.call('HSET', k('task', tid), 'state', to)
    redis.call('SREM', k('job', job, 'waiting'), tid)
    bump(k('job', job), TASK_QUEUED, -1)
    bump(k('job', job), to, 1)
    -- A shot of a failed anchor cannot be rendered anywhere (bad input); one of a cancelled job was cancelled.
    local fault = FAULT_BAD_INPUT
    if to == TASK_CANCELLED then fault = FAULT_CANCELLED end
    event(job, ev_kind, tid, tonumber(redis.call('HGET', k('task', tid), 'index')), '', 0, fault, msg)
  end
  redis.call('DEL', list)
end

local function is_fault(outcome)
  return IS_FAULT[outcome] == true
end

-- Counts the faults among the attempts after the first `from` (those were
-- made before a retry of the job: TaskRecord::counted_from).
local function count_faults(attempts, from)
  local n = 0
  for i, a in ipairs(attempts) do
    if i > from and is_fault(a.outcome) then n = n + 1 end
  end
  return n
end

-- Returns a task's counted_from (absent on tasks never retried).
local function counted_from(tid)
  return tonumber(redis.call('HGET', k('task', tid), 'counted') or '0')
end

-- What `end_lease` reads of a task, in this order.
local end_lease_fields = {'job', 'index', 'model', 'holder', 'epoch', 'attempts', 'avoid'}

-- Ends the running attempt of a leased task and moves the task to `to`;
-- `fence` moves its epoch on (the old holder's reports become stale).
-- Returns the job's new state if this ended the job, else ''. A completion
-- passes its result's render_ms (otherwise read back from the stored result),
-- the job's project, the task's end_lease_fields as it read them (`known`,
-- otherwise read here) and more fields to write with the task's (`extra`,
-- field and value pairs).
local function end_lease(tid, outcome, fault, msg, to, ev_kind, fence, render_ms, project, known, extra)
  local t = k('task', tid)
  local f = known or redis.call('HMGET', t, unpack(end_lease_fields))
  local job, index, model, holder, epoch = f[1], tonumber(f[2]), f[3], f[4], tonumber(f[5])
  local attempts = decode(f[6])
  local a = attempts[#attempts]
  a.outcome = outcome
  a.fault = fault
  a.message = msg
  a.ended = NOW
  local fields = {'attempts', cjson.encode(attempts), 'state', to, 'holder', '', 'deadline', '0'}
  if fence then
    table.insert(fields, 'epoch')
    table.insert(fields, int(epoch + 1))
  end
  for _, v in ipairs(extra or {}) do table.insert(fields, v) end
  local worker_faulted = holder and holder ~= '' and is_fault(outcome)
  if worker_faulted then
    local avoid = decode(f[7])
    table.insert(avoid, holder)
    table.insert(fields, 'avoid')
    table.insert(fields, cjson.encode(avoid))
  end
  redis.call('HSET', t, unpack(fields))
  redis.call('ZREM', k('leases'), tid)
  redis.call('SREM', k('job', job, 'leased'), tid)
  -- A live preview lives only while its lease holds (preview.lua).
  redis.call('DEL', k('preview', tid))
  if holder and holder ~= '' then
    redis.call('SREM', k('worker', holder, 'running'), tid)
    if worker_faulted then
      bump(k('worker', holder), 'failed', 1)
      count_fault(job, holder)
    elseif outcome == OUTCOME_COMPLETED then
      bump(k('worker', holder), 'completed', 1)
    end
  end
  bump(k('job', job), TASK_LEASED, -1)
  bump(k('job', job), to, 1)
  if project == nil then project = redis.call('HGET', k('job', job), 'project') end
  -- Usage of the day, by project and model (types.rs: Usage, usage_day).
  if outcome == OUTCOME_COMPLETED or is_fault(outcome) then
    local base = table.concat({int(math.floor(NOW / USAGE_DAY_MS)), project, model}, USAGE_SEP) .. USAGE_SEP
    if outcome == OUTCOME_COMPLETED then
      bump(k('usage'), base .. USAGE_IMAGES, 1)
      local render = render_ms
      if render == nil then
        render = 0
        local r = redis.call('HGET', t, 'result')
        if r and r ~= '' then render = cjson.decode(r).render_ms or 0 end
      end
      bump(k('usage'), base .. USAGE_RENDER_MS, render)
    else
      bump(k('usage'), base .. USAGE_FAILED, 1)
    end
  end
  if add(k('project_running'), project, -1) <= 0 then
    drop_if_spent(k('project_running'), project)
  end
  -- A project at its max_running_tasks has room again: wake waiting claims.
  if uncap(project) then wake_workers() end
  if to == TASK_QUEUED then
    requeue(job, tid, index, model)
    wake_workers()
  end
  event(job, ev_kind, tid, index, holder, epoch, fault, msg)
  if to == TASK_FAILED then end_dependents(job, index, TASK_FAILED, EV_FAILED, 'its anchor failed') end
  if to == TASK_CANCELLED then end_dependents(job, index, TASK_CANCELLED, EV_CANCELLED, 'job cancelled') end
  return finish_if_done(job)
end

-- Why (worker, epoch) does not hold the task.
local function stale_reason(tid, worker, epoch)
  local f = redis.call('HMGET', k('task', tid), 'state', 'epoch', 'holder')
  local state, cur, holder = f[1], tonumber(f[2]), f[3]
  if state == TASK_CANCELLED then return 'the job was cancelled' end
  if state == TASK_COMPLETED then
    return 'task already completed under epoch ' .. cur .. ' (this report: epoch ' .. epoch .. ')'
  end
  if state == TASK_FAILED then return 'the task already failed for good' end
  if epoch > cur then
    return 'epoch ' .. epoch .. ' was never issued for this task (the latest is epoch ' .. cur .. ')'
  end
  if state == TASK_LEASED and cur ~= epoch then
    if holder == worker then
      return 'epoch ' .. epoch .. ' is stale: this worker holds the task under epoch ' .. cur
    end
    return 'epoch ' .. epoch .. ' is stale: the lease expired and ' .. holder .. ' holds the task under epoch ' .. cur
  end
  if state == TASK_LEASED then return 'lease held by ' .. holder .. ', not ' .. worker end
  return 'epoch ' .. epoch .. ' expired and the task is queued again (epoch ' .. cur .. ')'
end

-- True when a task whose state, epoch and holder fields are `f` is leased
-- to `worker` under `epoch`.
local function held_by(f, worker, epoch)
  return f[1] == TASK_LEASED and tonumber(f[2]) == epoch and f[3] == worker
end

local function holds(tid, worker, epoch)
  return held_by(redis.call('HMGET', k('task', tid), 'state', 'epoch', 'holder'), worker, epoch)
end

-- True when a worker whose last call was at `seen` (false: never) is alive:
-- it called within LIVE_MS (policy::alive).
local function alive_since(seen)
  return seen ~= false and NOW - tonumber(seen) < LIVE_MS
end

-- True when worker `w` is alive.
local function alive(w)
  return alive_since(redis.call('HGET', k('worker', w), 'seen'))
end

-- True when worker `w` is live for the policy: alive and not draining.
local function live(w)
  local f = redis.call('HMGET', k('worker', w), 'draining', 'seen')
  return f[1] ~= '1' and alive_since(f[2])
end

-- True when `owner` ('' without --auth) may act under worker id `w`: the
-- worker has no session (or one opened before sessions had owners), or its
-- session's owner is `owner` (policy::acts_for).
local function owner_allows(o, owner)
  return o == false or o == owner
end
local function acts_for(w, owner)
  return owner_allows(redis.call('HGET', k('worker', w), 'owner'), owner)
end

-- True when a worker whose assets json ({asset key: true}; false: none
-- stored) is `assets_json` holds every asset key of the json list
-- `needs_json` (policy::holds_all over policy::held_keys).
local function holds_needs(needs_json, assets_json)
  if needs_json == false or needs_json == '' or needs_json == '[]' then return true end
  local held = {}
  if assets_json then held = cjson.decode(assets_json) end
  for _, need in ipairs(cjson.decode(needs_json)) do
    if held[need] == nil then return false end
  end
  return true
end

-- True when a worker other than `not_worker` could take a task of `job` for
-- `model` (pinned to `mhash` unless empty) that needs the assets of the json
-- list `needs`: live, not draining, not quarantined for the job, holding the
-- model and the assets, and of the job's pinned class ('' when not pinned).
-- Workers in `skip` (a set) do not count. The policy's `policy::can_stand_in`
-- in Rust.
local function stand_in_exists(job, model, mhash, needs, not_worker, pinned_class, skip)
  for _, w in ipairs(redis.call('SMEMBERS', k('workers'))) do
    if w ~= not_worker and not (skip and skip[w]) and live(w) then
      local f = redis.call('HMGET', k('worker', w), 'class', 'models', 'assets')
      local faults = faults_of(job, w)
      local hash = f[2] and cjson.decode(f[2])[model]
      if faults < QUARANTINE_AFTER and hash ~= nil and (mhash == '' or hash == mhash)
        and holds_needs(needs, f[3])
        and (pinned_class == '' or (f[1] or '') == pinned_class) then
        return true
      end
    end
  end
  return false
end
