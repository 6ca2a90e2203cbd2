-- A fragment, not a script: lua/publish.lua and lua/start.lua begin with `-- with: record_event`, and
-- script_pipeline.lua() puts this text before theirs (scripts cannot call each other).
-- record(): the job's event number `seq_text` (its JSON without the opening brace: `body`) appended to the replay
-- stream (capped at `maxlen`), counted in the state hash and published on the job's shard channel.
local function record(state_key, events_key, seq_text, body, maxlen)
  local message = '{"seq":' .. seq_text .. ',' .. body
  redis.call('XADD', events_key, 'MAXLEN', '~', maxlen, '*', 'e', message)
  redis.call('HSET', state_key, 'seq', seq_text)
  redis.call('SPUBLISH', string.sub(state_key, 1, -6) .. 'chan', message)  -- ivl:job:{id}:state -> …:chan
end
