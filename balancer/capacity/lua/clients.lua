-- Read clients' budgets and fair-share sums on one model, refilled to now, without
-- writing (ClientBook.state).
-- KEYS[i]  client i's budget, then the model's fair-share book last
-- ARGV     per client: its limits (see parse_limits), then its name
-- Returns  6 strings per client: tokens, requests, day_used, month_used, demand, used.

local now = clock()
local n = #KEYS - 1
local out = {}
for i = 1, n do
  local c = parse_client(ARGV[2 * i - 1])
  local name = ARGV[2 * i]
  local b = load_budget(KEYS[i], c, now)
  local demand, used = 0.0, 0.0
  if c.fair_window > 0 then
    local book, me = load_book(KEYS[#KEYS], name, now, c.fair_window)
    if me then demand, used = book[me].demand, book[me].used end
  end
  for _, x in ipairs({ b.tokens, b.requests, b.day_used, b.month_used, demand, used }) do
    out[#out + 1] = fmt(x)
  end
end
return out
