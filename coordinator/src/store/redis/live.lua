-- Reads the live workers (`live` in the prelude: policy::is_live) with their
-- models. A read: it changes nothing.
-- Returns LIVE_FIELDS values per live worker: id, models json ({name: hash}),
-- resident json (list).
local out = {}
for _, w in ipairs(redis.call('SMEMBERS', k('workers'))) do
  if live(w) then
    local f = redis.call('HMGET', k('worker', w), 'models', 'resident')
    for _, v in ipairs({w, f[1] or '{}', f[2] or '[]'}) do table.insert(out, v) end
  end
end
return out
