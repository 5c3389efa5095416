-- Leases up to max tasks to a worker in the order of the scheduling policy.
-- This mirrors coordinator/src/store/policy.rs step by step (the memory store
-- applies the same functions in memory/claim.rs): eligibility (job_allows;
-- task_allows = the model hash and the assets (policy::holds_all), then
-- policy::task_open_to, with stand_in_exists =
-- policy::can_stand_in), order (policy::job_rank), model affinity
-- (policy::choose, policy::switch_justified; a worker's 'loading' field is
-- policy::still_loading / policy::holds_for_affinity), LoRA-set affinity
-- (policy::needs_merge, policy::set_ready over each task's stored `lset`,
-- policy::task_lora_set), then batch filling with each task's stored batch
-- key (policy::task_batch_key), then LoRA sets ready here, then the same model.
-- Tasks whose recipe already has a result in the project for the worker's
-- class are completed from it on the way.
-- A project gets no lease past its max_running_tasks (policy::under_cap):
-- its leased tasks are counted in the `project_running` hash, which `lease` below and
-- `end_lease` (prelude) keep.
-- Arguments: the worker, max tasks, lease ttl ms, resident models json
--   (list), owner, caps json ({project: max_running_tasks}), ready LoRA sets
--   json ({model: [set key, ...]}), waking (true for a waiting claim's
--   retries: no sign of life, and nothing is leased to a worker silent for
--   the lease ttl, policy::waiting_claim_may_lease).
-- Returns {'unknown'}, {'bound'}, {'drain'}, or {'ok', n leases, n deduped, n finished,
--   LEASE_FIELDS values per lease (task, job, index, epoch, recipe, init,
--   anchor index or -1, file name), DEDUPED_FIELDS per deduped (task, job, file, source, model),
--   1 per finished job}.
-- Called by dispatch.lua, alone or with other calls in one run (a
-- completion's next claim among them).
-- A job's models ({job, 'models'}; only enqueue.lua adds to it), read once per run.
local models_of_job = {}
local function models_of(job)
  if models_of_job[job] == nil then models_of_job[job] = redis.call('SMEMBERS', k('job', job, 'models')) end
  return models_of_job[job]
end

-- What a claim reads of a queued task, in one read: what task_allows,
-- try_dedupe and the fill need, and (`full`) what a lease reads besides.
local candidate_fields = {'mhash', 'avoid', 'needs', 'rhash', 'index', 'file', 'steps', 'lset', 'bkey',
  'state', 'epoch', 'init', 'depends'}
local lease_fields = {'recipe', 'attempts'}
local candidate_full_fields = {unpack(candidate_fields)}
for _, name in ipairs(lease_fields) do table.insert(candidate_full_fields, name) end
local function candidate(tid, full)
  local names = candidate_fields
  if full then names = candidate_full_fields end
  local f = redis.call('HMGET', k('task', tid), unpack(names))
  local c = {tid = tid}
  for i, name in ipairs(names) do c[name] = f[i] end
  return c
end

local function claim(worker, max, ttl, resident_json, owner, caps_json, ready_json, waking)
local wk = k('worker', worker)
-- The worker's record in one read (a claim runs once per task). register.lua
-- writes `models` with every session, so a record without it is no worker.
local wf = redis.call('HMGET', wk, 'models', 'owner', 'draining', 'assets', 'class', 'loading', 'seen')
if not wf[1] then return {'unknown'} end
if not owner_allows(wf[2], owner) then return {'bound'} end
if not waking then
  redis.call('HSET', wk, 'seen', now_arg, 'resident', resident_json)
elseif NOW - tonumber(wf[7] or '0') >= ttl then
  return {'ok', 0, 0, 0}
else
  redis.call('HSET', wk, 'resident', resident_json)
end
if wf[3] == '1' then return {'drain'} end
local models = cjson.decode(wf[1])
-- Its LoRAs, embeddings and ControlNets (policy::held_keys).
local my_assets = wf[4]
local class = wf[5] or ''
local resident = {}
local any_resident = false
local reported = decode(resident_json)
for _, m in ipairs(reported) do resident[m] = true; any_resident = true end
if not any_resident then
  for m, _ in pairs(models) do resident[m] = true end
end
-- A switch in flight (policy::still_loading): the model a claim sent this
-- worker to load, until it reports it resident or holds no lease; meanwhile
-- it keeps to that model alone (policy::holds_for_affinity).
local loading = wf[6]
if loading then
  local reported_it = false
  for _, m in ipairs(reported) do if m == loading then reported_it = true end end
  if reported_it or redis.call('SCARD', k('worker', worker, 'running')) == 0 then
    redis.call('HDEL', wk, 'loading')
    loading = false
  end
end
if loading then resident = {[loading] = true} end

-- Jobs with work, in policy order, with what the policy needs of each.
local jobs = {}
for _, job in ipairs(redis.call('ZRANGE', k('ready'), 0, -1)) do
  local f = redis.call('HMGET', k('job', job), 'priority', 'project', 'served', 'state', 'class', 'pin', 'verify_of', 'dedupe', 'paused')
  -- A paused job stays on the ready set (it keeps its place) but is not leased (policy::leasable).
  if f[4] == JOB_RUNNING and f[9] ~= '1' then
    table.insert(jobs, {id = job, priority = tonumber(f[1]), project = f[2],
      served = counter_seen(k('job', job), 'served', f[3]), class = f[5] or '', pin = f[6] or '0',
      verify = f[7] or '', dedupe = f[8] or '0',
      project_served = counter(k('project_served'), f[2])})
  end
end
table.sort(jobs, function(a, b)
  if a.priority ~= b.priority then return a.priority > b.priority end
  if a.project_served ~= b.project_served then return a.project_served < b.project_served end
  if a.served ~= b.served then return a.served < b.served end
  return a.id < b.id
end)

local function job_allows(j)
  return not ((j.pin == '1' or j.verify ~= '') and j.class ~= '' and j.class ~= class)
end

-- Leased tasks of each capped project, counting those this claim leases.
local caps = decode(caps_json)
local running = {}
for project, _ in pairs(caps) do
  running[project] = counter(k('project_running'), project)
end
local function has_room(project)
  return caps[project] == nil or running[project] < caps[project]
end

-- Whether a stand-in exists for this (quarantined) worker, by job, model,
-- pinned hash and needed assets: asked once per claim rather than once per
-- candidate task.
local stand_ins = {}
local function stand_in_for_job(j, model, mhash, needs, pinned)
  local key = j.id .. '|' .. model .. '|' .. mhash .. '|' .. (needs or '')
  if stand_ins[key] == nil then
    stand_ins[key] = stand_in_exists(j.id, model, mhash, needs, worker, pinned, nil)
  end
  return stand_ins[key]
end

-- A worker quarantined for the job, or on the task's avoid list, takes the
-- task only when no other worker can (policy::task_open_to in Rust).
local function task_allows(j, c, model)
  if c.mhash ~= '' and c.mhash ~= models[model] then return false end
  if not holds_needs(c.needs, my_assets) then return false end
  local pinned = ''
  if j.pin == '1' then pinned = j.class end
  if faults_of(j.id, worker) >= QUARANTINE_AFTER and stand_in_for_job(j, model, c.mhash, c.needs, pinned) then
    return false
  end
  local avoid = decode(c.avoid)
  local skip, avoided = {}, false
  for _, w in ipairs(avoid) do
    skip[w] = true
    if w == worker then avoided = true end
  end
  return not (avoided and stand_in_exists(j.id, model, c.mhash, c.needs, worker, pinned, skip))
end

local deduped, finished = {}, {}
-- Completes a task from an earlier result of the same recipe and class; false if none.
local function try_dedupe(j, c, model)
  if j.dedupe ~= '1' or #deduped >= MAX_DEDUPED_PER_CLAIM * DEDUPED_FIELDS then return false end
  local tid = c.tid
  local t = k('task', tid)
  local earlier = redis.call('HGET', k('results', j.project), c.rhash .. '|' .. class)
  if not earlier then return false end
  local source = cjson.decode(earlier).object
  redis.call('HSET', t, 'state', TASK_COMPLETED, 'result', earlier, 'step', c.steps)
  redis.call('ZREM', k('q', j.id, model), tid)
  bump(k('job', j.id), TASK_QUEUED, -1)
  bump(k('job', j.id), TASK_COMPLETED, 1)
  if j.pin == '1' and j.class == '' then
    redis.call('HSET', k('job', j.id), 'class', class)
    j.class = class
  end
  event(j.id, EV_COMPLETED, tid, tonumber(c.index), '', 0, FAULT_NONE,
    'served from an earlier render of the same recipe (' .. source .. ')')
  release_dependents(j.id, tonumber(c.index), cjson.decode(earlier).sha256)
  for _, v in ipairs({tid, j.id, c.file, source, model}) do table.insert(deduped, v) end
  local done = finish_if_done(j.id)
  if done ~= '' then table.insert(finished, j.id) end
  return true
end

-- The first claimable task of each allowed job, in item order, deduping on the way.
-- As in the memory store: the worker's models with queued tasks when the
-- job's turn comes, in name order; each model's head is its first allowed
-- task not served from an earlier result, its queue read again after every
-- dedupe (serving an anchor may have queued its shots).
local first_choice, first_resident
for _, j in ipairs(jobs) do
  if first_resident then break end
  if job_allows(j) and has_room(j.project) then
    local held = {}
    -- A model whose queue is empty gives no head below.
    for _, model in ipairs(models_of(j.id)) do
      if models[model] ~= nil then table.insert(held, model) end
    end
    table.sort(held)
    local heads = {}
    for _, model in ipairs(held) do
      local again = true
      while again do
        again = false
        -- A few candidates: the first usually fits; more step over avoided tasks.
        local ids = redis.call('ZRANGE', k('q', j.id, model), 0, max + CLAIM_LOOKAHEAD - 1, 'WITHSCORES')
        for i = 1, #ids, 2 do
          local c = candidate(ids[i], true)
          if task_allows(j, c, model) then
            if try_dedupe(j, c, model) then
              again = true
            else
              table.insert(heads, {tid = ids[i], c = c, index = tonumber(ids[i + 1]), model = model})
            end
            break
          end
        end
      end
    end
    table.sort(heads, function(a, b) return a.index < b.index end)
    for _, h in ipairs(heads) do
      local pick = {tid = h.tid, c = h.c, job = j, model = h.model, priority = j.priority}
      if not first_choice then first_choice = pick end
      if resident[h.model] then first_resident = pick; break end
    end
  end
end

-- Model affinity: keep to resident models unless the best work is for
-- another model at a higher priority and a switch is justified.
local chosen
-- Returns, for each of the (one or two) models given, how many live workers
-- other than this one hold it for model affinity (policy::holds_for_affinity):
-- the model they are loading, else their resident models; and how many may
-- (none reported, in their catalog). One scan of the workers for both.
local function resident_holders(m1, m2)
  local held, unreported = {[m1] = 0}, {[m1] = 0}
  if m2 then held[m2] = 0; unreported[m2] = 0 end
  for _, w in ipairs(redis.call('SMEMBERS', k('workers'))) do
    if w ~= worker and live(w) then
      local f = redis.call('HMGET', k('worker', w), 'resident', 'loading')
      local reported = cjson.decode(f[1] or '[]')
      if f[2] then
        if held[f[2]] then held[f[2]] = held[f[2]] + 1 end
      elseif #reported == 0 then
        local m = redis.call('HGET', k('worker', w), 'models')
        if m then
          local catalog = cjson.decode(m)
          for model, _ in pairs(held) do
            if catalog[model] ~= nil then unreported[model] = unreported[model] + 1 end
          end
        end
      else
        for _, name in ipairs(reported) do
          if held[name] then held[name] = held[name] + 1 end
        end
      end
    end
  end
  return held, unreported
end

-- Queued tasks of `model` in the running jobs.
local function backlog_of(model)
  local backlog = 0
  for _, j in ipairs(jobs) do backlog = backlog + redis.call('ZCARD', k('q', j.id, model)) end
  return backlog
end

-- policy::switch_justified: load `to` (backlog, holders, unreported) rather
-- than keep to the resident model `from` (nil: no resident work of the same priority).
local function switch_justified(to_backlog, to_holders, to_unreported, from_backlog, from_holders, from_unreported)
  if to_holders + to_unreported == 0 then return true end
  if to_backlog <= SWITCH_BACKLOG_PER_HOLDER * (to_holders + to_unreported) then return false end
  if from_backlog == nil or from_backlog == 0 then return true end
  -- from_backlog / from_holders + margin / PERCENT < to_backlog / to_holders, in integers.
  return from_unreported == 0 and to_unreported == 0 and from_holders > 0 and to_holders > 0 and PERCENT * from_backlog * to_holders + SWITCH_MARGIN_PERCENT * from_holders * to_holders
    < PERCENT * to_backlog * from_holders
end

if first_choice then
  if first_resident and first_resident.priority >= first_choice.priority then
    -- Keep to resident work unless the first choice's model would starve:
    -- waiting work and no live worker holding it.
    -- Or leave the resident model when that balances the farm.
    if first_choice.tid == first_resident.tid then
      chosen = first_resident
    else
      local c, r = first_choice.model, first_resident.model
      local held, unreported
      if c ~= r then held, unreported = resident_holders(c, r) else held, unreported = resident_holders(c) end
      if held[c] + unreported[c] == 0 then
        chosen = first_choice
      elseif c ~= r and switch_justified(backlog_of(c), held[c], unreported[c],
          backlog_of(r), held[r], unreported[r]) then
        chosen = first_choice
      else
        chosen = first_resident
      end
    end
  else
    local model = first_choice.model
    local held, unreported = resident_holders(model)
    if switch_justified(backlog_of(model), held[model], unreported[model], nil, nil, nil) then
      chosen = first_choice
    else
      chosen = first_resident
    end
  end
end
-- A switch: this worker counts as loading the model until it reports it.
if chosen and not resident[chosen.model] then
  redis.call('HSET', wk, 'loading', chosen.model)
end

-- LoRA-set affinity (policy step 4): the chosen task's job and model stand;
-- when it would make this worker merge LoRAs, the first of the first
-- READY_LOOKAHEAD queued tasks of that job and model that the worker may take
-- and holds the set of ready goes first, served from an earlier result on the
-- way (memory/claim.rs: prefer_ready).
local ready = {}
for model, sets in pairs(decode(ready_json)) do
  ready[model] = {}
  for _, set in ipairs(sets) do ready[model][set] = true end
end
local function set_ready(model, set)
  return set ~= '' and ready[model] ~= nil and ready[model][set] == true
end
if chosen then
  local set = chosen.c.lset or ''
  if set ~= '' and not set_ready(chosen.model, set) then
    local j = chosen.job
    for _, tid in ipairs(redis.call('ZRANGE', k('q', j.id, chosen.model), 0, READY_LOOKAHEAD - 1)) do
      local c = candidate(tid, true)
      if set_ready(chosen.model, c.lset or '') and task_allows(j, c, chosen.model)
        and not try_dedupe(j, c, chosen.model) then
        chosen = {tid = tid, c = c, job = j, model = chosen.model, priority = chosen.priority}
        break
      end
    end
  end
end

local leases = {}
local function lease(c, j, model)
  local tid = c.tid
  local t = k('task', tid)
  if c.recipe == nil then
    local more = redis.call('HMGET', t, unpack(lease_fields))
    for i, name in ipairs(lease_fields) do c[name] = more[i] end
  end
  local epoch = tonumber(c.epoch) + 1
  local attempts = decode(c.attempts)
  table.insert(attempts, {worker = worker, epoch = epoch, started = NOW, outcome = OUTCOME_RUNNING, fault = FAULT_NONE, message = ''})
  local deadline = int(NOW + ttl)
  redis.call('HSET', t, 'state', TASK_LEASED, 'epoch', int(epoch), 'holder', worker, 'step', '0',
    'deadline', deadline, 'attempts', cjson.encode(attempts))
  redis.call('ZREM', k('q', j.id, model), tid)
  redis.call('ZADD', k('leases'), deadline, tid)
  redis.call('SADD', k('job', j.id, 'leased'), tid)
  redis.call('SADD', k('worker', worker, 'running'), tid)
  bump(k('job', j.id), TASK_QUEUED, -1)
  bump(k('job', j.id), TASK_LEASED, 1)
  bump(k('project_running'), j.project, 1)
  if caps[j.project] ~= nil then running[j.project] = running[j.project] + 1 end
  local served = next_served()
  set_counter(k('job', j.id), 'served', served)
  set_counter(k('project_served'), j.project, served)
  if j.pin == '1' and j.class == '' then
    redis.call('HSET', k('job', j.id), 'class', class)
    j.class = class
  end
  event(j.id, EV_LEASED, tid, tonumber(c.index), worker, epoch, FAULT_NONE, '')
  for _, v in ipairs({tid, j.id, c.index, epoch, c.recipe, c.init, c.depends, c.file}) do table.insert(leases, v) end
end

if chosen then
  lease(chosen.c, chosen.job, chosen.model)
  local taken = 1
  -- The batch key and LoRA set matter only when there are slots to fill.
  local key, first_set = chosen.c.bkey, chosen.c.lset or ''
  -- Fill free slots: the same UNet batch first, then LoRA sets ready here
  -- or the first task's, then the same model (policy step 5). Each pass reads
  -- a job's queue once, so shots a served anchor releases wait for the next
  -- pass (memory/claim.rs: fill).
  for _, pass in ipairs({'batch', 'ready', 'model'}) do
    for _, j in ipairs(jobs) do
      if taken >= max then break end
      if job_allows(j) then
        local ids = redis.call('ZRANGE', k('q', j.id, chosen.model), 0, (max - taken) + FILL_LOOKAHEAD - 1)
        for _, tid in ipairs(ids) do
          if taken >= max or not has_room(j.project) then break end
          local c = candidate(tid, false)
          local fits = true
          if pass == 'batch' then
            fits = c.bkey == key
          elseif pass == 'ready' then
            local lset = c.lset or ''
            fits = lset ~= '' and (lset == first_set or set_ready(chosen.model, lset))
          end
          -- A recipe with an earlier result is served from it and takes no slot.
          if fits and c.state == TASK_QUEUED and task_allows(j, c, chosen.model)
            and not try_dedupe(j, c, chosen.model) then
            lease(c, j, chosen.model)
            taken = taken + 1
          end
        end
      end
    end
  end
end

-- A job this claim finished has left the ready set already (retire), so
-- only the queued count matters here.
for _, j in ipairs(jobs) do
  if counter(k('job', j.id), TASK_QUEUED) == 0 then
    redis.call('ZREM', k('ready'), j.id)
  end
end
-- A project at its cap wakes waiting claims when one of its leases ends.
for project, _ in pairs(caps) do
  if not has_room(project) then mark_capped(project) end
end
local out = {'ok', #leases / LEASE_FIELDS, #deduped / DEDUPED_FIELDS, #finished}
for _, v in ipairs(leases) do table.insert(out, v) end
for _, v in ipairs(deduped) do table.insert(out, v) end
for _, v in ipairs(finished) do table.insert(out, v) end
return out
end
